"""The CLI contract, run as real subprocesses on the shared model and a small sample of the shared images."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "NNI_FRAMEWORK": "none"}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "selfxit", *args], capture_output=True, text=True, env=ENV,
                          timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"selfxit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_candidates_json(shared):
    found = json.loads(run("candidates", "--model", "cifar_resnet20", "--json").stdout)
    assert len(found) >= 3
    assert {"name", "shape", "remaining_flops"} <= set(found[0])
    remaining = [c["remaining_flops"] for c in found]
    assert remaining == sorted(remaining, reverse=True)
    # ResNet-20's maps all fit collect's default budget, so each row stores them whole (float16)
    assert all(c["stored_bytes"] == 2 * c["shape"][0] * c["shape"][1] * c["shape"][2] for c in found)
    assert all(0 < c["cumulative_flops_fraction"] < 1 for c in found)
    everything = json.loads(run("candidates", "--model", "cifar_resnet20", "--json", "--all").stdout)
    rejected = [c for c in everything if not c["kept"]]
    assert rejected and all(c["reason"] and c["stored_bytes"] is None for c in rejected)
    assert [c for c in everything if c["kept"]] == [{**c, "kept": True} for c in found]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:resnet50 is randomly initialised")
def test_candidates_stored_bytes_at_real_size(capsys):
    """ResNet-50 at 224 (random init): every candidate stores the default head's 4x4 grid, 0.5 MB per row at most."""
    from selfxit.cli import main
    assert main(["candidates", "--model", "resnet50", "--random-init", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert all(c["stored_bytes"] == 2 * c["shape"][0] * 16 for c in found)
    assert sum(c["stored_bytes"] for c in found) <= 512 * 1024
    assert main(["candidates", "--model", "resnet50", "--random-init", "--json", "--budget", "1000"]) == 2
    assert "over the budget of 1,000 bytes" in capsys.readouterr().err


@pytest.mark.slow
def test_enable_then_evaluate_json(shared, tmp_path):
    bundle = tmp_path / "bundle"
    data = str(shared / "data" / "cifar10-test")
    fit_file = tmp_path / "fit.yaml"  # the flag overrides the file's tolerance; max_exits comes from the file
    fit_file.write_text("tolerance: 0.2\nmax_exits: 1\n")
    run("enable", "--model", "cifar_resnet20", "--data", data, "--tolerance", "0.05", "--out", str(bundle),
        "--max-samples", "300", "--seed", "3", "--augment", "1", "--max-candidates", "3", "--config", str(fit_file))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["provenance"]["seed"] == 3 and manifest["provenance"]["max_samples"] == 300
    out = json.loads(run("evaluate", "--bundle", str(bundle), "--model", "cifar_resnet20", "--data", data,
                         "--split", "test", "--json").stdout)
    for key in ("flops_fraction", "agreement", "accuracy_backbone", "accuracy_early_exit", "exit_rates",
                "latency_ratio_b1", "latency_ratio_b32", "tolerance"):
        assert key in out
    assert out["num_samples"] == 90  # the held-back 30% of the 300 samples
    assert 0 < out["flops_fraction"] <= 1.05 and 0 <= out["agreement"] <= 1
    assert out["tolerance"] == 0.05 and 0.5 < out["accuracy_backbone"] <= 1
    assert abs(sum(out["exit_rates"].values()) - 1) < 1e-6
    assert len(out["exit_rates"]) <= 2  # at most max_exits=1 exit, plus "final"


@pytest.mark.slow
def test_bad_inputs_get_clear_errors(shared, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("enable", "--model", "cifar_resnet20", "--data", str(empty), "--tolerance", "0.01",
               "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode != 0 and ("empty" in proc.stderr.lower() or "no images" in proc.stderr.lower())
    assert not (tmp_path / "b").exists()
    proc = run("enable", "--model", "cifar_resnet20", "--data", str(empty), "--tolerance", "1.5",
               "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode != 0 and "tolerance" in proc.stderr
    proc = run("candidates", "--model", "resnet_does_not_exist", "--json", check=False)
    assert proc.returncode != 0 and "resnet_does_not_exist" in proc.stderr
    proc = run("evaluate", "--bundle", str(tmp_path / "missing"), "--model", "cifar_resnet20",
               "--data", str(shared / "data" / "cifar10-test"), "--json", check=False)
    assert proc.returncode != 0 and "not a selfxit bundle" in proc.stderr


@pytest.mark.slow
def test_corrupt_image_is_named(shared, tmp_path):
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    src = sorted((shared / "data" / "cifar10-test" / "cat").iterdir())[:20]
    for p in src:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    proc = run("enable", "--model", "cifar_resnet20", "--data", str(tmp_path / "imgs"), "--tolerance", "0.05",
               "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode != 0 and "broken.jpg" in proc.stderr
    assert not (tmp_path / "b").exists()


def _enable_args(*extra):
    from selfxit.cli import build_parser
    return build_parser().parse_args(["enable", "--model", "cifar_resnet20", "--data", "d", "--out", "o", *extra])


def test_enable_config_file_with_explicit_flags_on_top(tmp_path):
    from selfxit.cli.enable import fit_config_from_args
    from selfxit.fit.config import FitConfig
    assert fit_config_from_args(_enable_args()) == FitConfig()  # neither file nor flags: FitConfig's defaults
    fit_file = tmp_path / "fit.yaml"
    fit_file.write_text("tolerance: 0.03\ndelta: 0.2\nmax_exits: 2\ngate: learned\nmethod: certified\n")
    from_file = fit_config_from_args(_enable_args("--config", str(fit_file)))
    assert (from_file.tolerance, from_file.delta, from_file.max_exits, from_file.gate) == (0.03, 0.2, 2, "learned")
    mixed = fit_config_from_args(_enable_args("--config", str(fit_file), "--tolerance", "0.01", "--gate", "confidence",
                                              "--max-exits", "4"))
    assert (mixed.tolerance, mixed.delta, mixed.max_exits, mixed.gate) == (0.01, 0.2, 4, "confidence")
    flags_only = fit_config_from_args(_enable_args("--delta", "0.05"))
    assert (flags_only.tolerance, flags_only.delta) == (FitConfig().tolerance, 0.05)


def test_enable_bad_config_fails_before_loading_anything(tmp_path, capsys):
    from selfxit.cli import main
    bad = tmp_path / "fit.yaml"
    bad.write_text("tolerance: 0.01\nmax_exit: 2\n")  # typo: max_exit
    base = ["enable", "--model", "resnet_does_not_exist", "--data", str(tmp_path), "--out", str(tmp_path / "b")]
    assert main([*base, "--config", str(bad)]) == 2
    assert "max_exit" in capsys.readouterr().err
    assert main([*base, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_enable_bad_augmentation_fails_before_loading_anything(tmp_path, capsys):
    from selfxit.cli import main
    base = ["enable", "--model", "resnet_does_not_exist", "--data", str(tmp_path), "--out", str(tmp_path / "b")]
    assert main([*base, "--augment", "{copies: 2, mixup: -1}"]) == 2
    assert "--augment: augment mixup must be an int in [0, 16]" in capsys.readouterr().err
    assert main([*base, "--augment", "{copies: 2, blur: 1}"]) == 2
    assert "unknown keys ['blur']" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):  # neither a number nor a mapping: argparse refuses it
        main([*base, "--augment", "strong"])
    assert "--augment" in capsys.readouterr().err


def test_no_arguments_runs_demo(monkeypatch):
    import selfxit.cli.demo
    from selfxit.cli import main
    seen = []
    monkeypatch.setattr(selfxit.cli.demo, "run", seen.append)
    assert main([]) == 0
    assert [a.command for a in seen] == ["demo"] and seen[0].tolerance is None and seen[0].seed == 0


def test_argument_errors_exit_2():
    proc = run("enable", "--model", "cifar_resnet20", check=False)
    assert proc.returncode == 2 and "required" in proc.stderr
    proc = run("enable", "--model", "cifar_resnet20", "--data", "d", "--out", "o", "--gate", "oracle", check=False)
    assert proc.returncode == 2 and "--gate" in proc.stderr


def test_enable_gate_choices_match_the_library():
    """cli/enable.py spells the gate names out (so --help imports no torch); they must stay the library's."""
    from selfxit.cli.enable import GATES
    from selfxit.fit.gates import GATES as LIBRARY_GATES
    assert tuple(GATES) == tuple(LIBRARY_GATES)
