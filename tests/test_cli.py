"""The CLI contract, run as real subprocesses on the shared model and a small sample of the shared images."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "NNI_FRAMEWORK": "none"}


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "selfxit", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"selfxit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_candidates_json(shared):
    found = json.loads(run("candidates", "--model", "cifar_resnet20", "--json").stdout)
    assert len(found) >= 3
    assert {"name", "shape", "remaining_flops"} <= set(found[0])
    remaining = [c["remaining_flops"] for c in found]
    assert remaining == sorted(remaining, reverse=True)


def test_enable_then_evaluate_json(shared, tmp_path):
    bundle = tmp_path / "bundle"
    data = str(shared / "data" / "cifar10-test")
    run("enable", "--model", "cifar_resnet20", "--data", data, "--tolerance", "0.05", "--out", str(bundle),
        "--max-samples", "300", "--seed", "3", "--augment", "1", "--max-candidates", "3")
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
