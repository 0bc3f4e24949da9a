"""NAS of exit heads: config validation, the NNI model space and freeze, search runs, resume, failures, CLI."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selfxit
import selfxit.search.run as search_mod
from selfxit.core.candidates import Candidate
from selfxit.core.heads import build_head, concrete_spec
from selfxit.fit.medial import MedialWriter
from selfxit.search.config import (
    SearchConfig,
    SearchConfigError,
    SpaceConfig,
    load_config,
    searched_spec,
    shipped_configs,
)
from selfxit.search.run import apply_search, load_search, run_search
from selfxit.search.space import HeadSpace, build_strategy
from selfxit.settings import PROJECT_ROOT
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData

torch.set_num_threads(1)
SPACES = PROJECT_ROOT / "search_spaces"
SMALL = {"space": {"conv_layers": [0, 1], "channels": [4], "kernel": [1, 3], "stride": [1, 2], "pool": [1, 2],
                   "linear_layers": [1, 2], "width": [8, 16]},
         "trials_per_layer": 4, "training": {"epochs": 1, "max_rows": 64, "batch_size": 32}}


# ---- config files and validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["conv_linear.yaml", "linear.yaml"])
def test_shipped_configs_parse_and_round_trip(name):
    config = load_config(SPACES / name)
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert config.strategy == "random" and config.trials_per_layer >= 1 and config.training_service is None


def test_conv_linear_is_the_papers_space():
    space = load_config(SPACES / "conv_linear.yaml").space
    assert max(space.conv_layers) == 2 and max(space.linear_layers) == 2
    assert space.kernel == [1, 3, 5] and space.stride == [1, 2, 3] and "none" in space.pool


def _error(raw) -> str:
    with pytest.raises(SearchConfigError) as info:
        SearchConfig.from_dict(raw)
    return str(info.value)


def test_bad_configs_name_the_key_and_the_allowed_values():
    space = SMALL["space"]
    message = _error({"space": space, "trails_per_layer": 3})
    assert "trails_per_layer" in message and "trials_per_layer" in message
    message = _error({"space": {**space, "kernal": [3]}})
    assert "space.kernal" in message and "kernel" in message
    message = _error({"space": {**space, "kernel": [3, 4]}})
    assert "space.kernel" in message and "4" in message and "1, 3, 5, 7" in message
    message = _error({"space": {**space, "width": []}})
    assert "space.width" in message and "non-empty" in message
    message = _error({"space": space, "strategy": "bayes"})
    assert "bayes" in message and "random, grid, evolution, tpe" in message
    message = _error({"space": space, "strategy": {"name": "evolution", "options": {"popsize": 3}}})
    assert "popsize" in message and "population_size" in message
    message = _error({"space": space, "strategy": {"name": "evolution", "options": {"population_size": 2,
                                                                                    "sample_size": 5}}})
    assert "sample_size" in message
    message = _error({"space": {k: v for k, v in space.items() if k != "stride"}})
    assert "space.stride" in message and "required" in message
    message = _error({"space": space, "training": {"validation_split": "test"}})
    assert "training.validation_split" in message and "tune, val" in message
    message = _error({"space": space, "training_service": {"platform": "slurm"}})
    assert "slurm" in message and "remote" in message
    message = _error({"space": space, "training_service": {"platform": "remote", "machines": []}})
    assert "training_service" in message and "machines" in message
    assert "trial_concurrency" in _error({"space": space, "trial_concurrency": 4})
    assert "'space' is required" in _error({"strategy": "random"})


def test_training_service_section_passes_through():
    section = {"platform": "remote", "machine_list": [{"host": "10.0.0.2", "user": "me", "ssh_key_file": "/k"}]}
    config = SearchConfig.from_dict({"space": SMALL["space"], "training_service": section, "trial_concurrency": 4})
    assert config.training_service == section and config.trial_concurrency == 4
    experiment = search_mod._experiment_config(config, 20, Path("/tmp/x"))
    assert experiment.execution_engine.name == "ts" and experiment.trial_concurrency == 4
    local = search_mod._experiment_config(SearchConfig.from_dict({"space": SMALL["space"]}), 20, Path("/tmp/x"))
    assert local.execution_engine.name == "sequential" and local.max_trial_number == 20


def test_unparsable_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  kernel: [1, 3\n  stride: [1]\n")
    with pytest.raises(SearchConfigError, match="line"):
        load_config(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"space": {"kernel": [1,]}}')
    with pytest.raises(SearchConfigError, match="line 1"):
        load_config(bad_json)
    good_json = tmp_path / "good.json"
    good_json.write_text(json.dumps(SMALL))
    assert load_config(good_json).trials_per_layer == 4


def test_impossible_shapes_are_refused():
    space = load_config(SPACES / "conv_linear.yaml").space
    space.check_fits("ok", (64, 8, 8))
    with pytest.raises(SearchConfigError, match="space.stride"):
        space.check_fits("tiny", (16, 2, 2))
    with pytest.raises(SearchConfigError, match="conv_layers"):
        space.check_fits("tokens", (5, 12))
    load_config(SPACES / "linear.yaml").space.check_fits("tokens", (5, 12))


@pytest.mark.parametrize("name,cls", [("random", "Random"), ("grid", "GridSearch"),
                                      ("evolution", "RegularizedEvolution"), ("tpe", "TPE")])
def test_strategies_are_nni_strategies(name, cls):
    assert type(build_strategy(SearchConfig.from_dict({**SMALL, "strategy": name}))).__name__ == cls


# ---- the NNI model space and freeze ------------------------------------------------------------------------

SPACE = load_config(SPACES / "conv_linear.yaml").space


@settings(max_examples=25, deadline=None)
@given(st.data(), st.sampled_from([(16, 8, 8), (32, 12, 12), (8, 9, 7)]))
def test_freeze_builds_the_sampled_architecture(data, shape):
    labels = SPACE.labels(shape)
    choices = {label: data.draw(st.sampled_from(values)) for label, values in labels.items()}
    frozen = HeadSpace(asdict(SPACE), list(shape), 10).freeze(choices)
    spec = SPACE.spec(choices, shape)
    assert frozen.spec == spec
    assert len(spec["convs"]) == choices["conv_layers"] and len(spec["hidden"]) == choices["linear_layers"] - 1
    assert searched_spec(SPACE, choices, shape) == spec  # what searches and bundles store: concrete, no NNI
    legacy = {"kind": "searched", "space": SPACE.to_dict(), "choices": choices}  # format-1 bundles stored this
    rebuilt = build_head(legacy, shape, 10)
    reference = build_head(spec, shape, 10)
    assert str(rebuilt) == str(reference) == str(frozen.head)
    assert rebuilt.state_dict().keys() == frozen.head.state_dict().keys()  # old bundles' weights still load
    assert rebuilt(torch.randn(2, *shape)).shape == (2, 10)


def test_bad_choices_are_refused():
    choices = SPACE.middle((16, 8, 8))
    with pytest.raises(ValueError, match="allowed values"):
        searched_spec(SPACE, {**choices, "conv1_kernel": 7}, (16, 8, 8))
    with pytest.raises(ValueError, match="missing"):
        searched_spec(SPACE, {k: v for k, v in choices.items() if k != "pool"}, (16, 8, 8))
    with pytest.raises(ValueError, match="lack 'pool'"):  # a legacy spec missing a choice: a clear error, no NNI
        concrete_spec({"kind": "searched", "space": SPACE.to_dict(),
                       "choices": {k: v for k, v in choices.items() if k != "pool"}}, (16, 8, 8))


def test_shipped_configs_are_found_by_name():
    assert {"conv_linear", "linear"} <= set(shipped_configs())
    assert load_config("conv_linear") == load_config(SPACES / "conv_linear.yaml")
    with pytest.raises(FileNotFoundError, match="conv_linear"):
        load_config("no_such_space")


@pytest.mark.slow
def test_searched_bundle_loads_without_nni(tmp_path):
    """A bundle with searched heads must load in a process where NNI cannot be imported."""
    script = f"""
import sys, json, torch
sys.modules['nni'] = None  # importing nni now raises ImportError
import selfxit
from selfxit.core.heads import build_head
from selfxit.zoo.cifar_resnet import cifar_resnet
model = cifar_resnet('cifar_resnet20').eval()
ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), candidate_layers=['layer2'])
from selfxit.core.exits import ExitRecord
spec = {{'kind': 'searched', 'space': {SPACE.to_dict()!r}, 'choices': {SPACE.middle((32, 16, 16))!r}}}
from selfxit.core.heads import concrete_spec
shape = ee.candidates[0].shape
ee.set_records([ExitRecord('layer2', build_head(spec, shape, 10), 1.0, 0.5, spec=concrete_spec(spec, shape),
                           shape=shape, head_flops=1)])
ee.save({str(tmp_path / 'b')!r})
loaded = selfxit.load({str(tmp_path / 'b')!r}, model)
print(json.dumps([loaded.head_specs['layer2']['kind'], 'nni' in sys.modules and sys.modules['nni'] is not None]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["conv_linear", False]


# ---- search runs on a small synthetic medial dataset -----------------------------------------------------------

@pytest.fixture()
def medial(tmp_path):
    """160 rows, two candidates; the teacher is a function of the activations, so heads can learn it."""
    rng = np.random.default_rng(0)
    shapes = [(4, 6, 6), (8, 3, 3)]
    n = 160
    acts = [rng.standard_normal((n, *s)).astype(np.float32) for s in shapes]
    logits = acts[0].reshape(n, 4, -1).mean(-1) @ rng.standard_normal((4, 5)) * 4
    probs = torch.softmax(torch.from_numpy(logits), 1)
    split = np.repeat([0, 1, 2, 3], [80, 30, 30, 20]).astype(np.uint8)
    writer = MedialWriter(tmp_path / "medial", ["a", "b"], shapes, n, 5, seed=0)
    writer.append([torch.from_numpy(a) for a in acts], probs, split, np.arange(n), np.full(n, -1))
    return writer.close()


CANDS = [Candidate("a", (4, 6, 6), 10**7), Candidate("b", (8, 3, 3), 10**7)]


def _fake(calls, fail_when=None, interrupt_at=None):
    """A stand-in trainer: a deterministic score from the spec, recording each call."""
    def train(model, job):
        calls.append(model.spec)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if fail_when is not None and fail_when(model.spec):
            raise RuntimeError("out of memory (simulated)")
        agreement = 0.5 + 0.1 * len(model.spec["hidden"]) + 0.01 * model.spec["pool"]
        return {"spec": model.spec, "head_flops": 100, "head_params": 10, "cached": False, "default": agreement,
                "status": "trained", "agreement": agreement, "seconds": 0.0}
    return train


def test_real_trial_reports_agreement_flops_and_score(medial, tmp_path):
    result = run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 2}, tmp_path / "s", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "s" / "layers" / "a" / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["status"] == "trained" for r in rows)
    for r in rows:
        assert r["score"] == pytest.approx(r["agreement"] - r["head_flops"] / 10**7)
        assert r["head_flops"] > 0 and r["head_params"] > 0 and r["seconds"] > 0
    assert result.layers[0].best["score"] == max(r["score"] for r in rows)



def test_flops_budget(medial, tmp_path):
    def history(folder):
        path = tmp_path / folder / "layers" / "a" / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # Random search: the budget is an NNI constraint, so every proposed head fits it.
    budget = Candidate("a", (4, 6, 6), 100_000)  # 5% of it: 5,000 FLOPs, which the conv heads of SMALL exceed
    run_search(medial, [budget], 5, {**SMALL, "trials_per_layer": 6}, tmp_path / "r", progress=False)
    rows = history("r")
    assert len(rows) == 6 and all(r["status"] == "trained" and r["head_flops"] <= 5_000 for r in rows)
    # Nothing fits: no trial runs and the layer is dropped.
    tiny = Candidate("a", (4, 6, 6), 1000)
    result = run_search(medial, [tiny], 5, {**SMALL, "trials_per_layer": 2}, tmp_path / "t", progress=False)
    assert history("t") == [] and "no head of the space fits" in result.dropped["a"]
    # Grid search proposes any head; one over the budget is reported without training.
    run_search(medial, [budget], 5, {**SMALL, "trials_per_layer": 64, "strategy": "grid"}, tmp_path / "g",
               progress=False)
    over = [r for r in history("g") if r["status"] == "over_budget"]
    assert over and all(r["score"] == -1.0 and r["head_flops"] > 5_000 and r["seconds"] < 1 for r in over)


@pytest.mark.parametrize("strategy", ["random", "grid", "evolution", pytest.param("tpe", marks=pytest.mark.slow)])
def test_search_with_each_strategy(medial, tmp_path, monkeypatch, strategy):
    from nni.tools.nnictl.constants import NNI_HOME_DIR
    home_manifest = Path(NNI_HOME_DIR) / ".experiment"
    before = home_manifest.read_bytes() if home_manifest.exists() else None
    calls = []
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake(calls))
    options = {"population_size": 2, "sample_size": 1} if strategy == "evolution" else {}
    config = {**SMALL, "trials_per_layer": 3, "strategy": {"name": strategy, "options": options}}
    result = run_search(medial, CANDS, 5, config, tmp_path / "s", progress=False)
    assert [r.layer for r in result.layers] == ["a", "b"] and set(result.heads) == {"a", "b"}
    assert 0 < len(calls) <= 6
    assert (tmp_path / "s" / "nni" / ".experiment").exists()  # NNI's manifest is in the output folder ...
    after = home_manifest.read_bytes() if home_manifest.exists() else None
    assert after == before  # ... and nothing was written under the home folder


def test_results_feed_fit_and_drop_near_chance_layers(medial, tmp_path, monkeypatch):
    def train(model, job):
        agreement = 0.9 if job["layer"] == "a" else 0.2  # 'b' stays near the majority rate
        return {"spec": model.spec, "head_flops": 100, "head_params": 10, "cached": False, "default": agreement,
                "status": "trained", "agreement": agreement, "seconds": 0.0}
    monkeypatch.setattr(search_mod, "_train_and_measure", train)
    result = run_search(medial, CANDS, 5, {**SMALL, "trials_per_layer": 2}, tmp_path / "s", progress=False)
    assert set(result.heads) == {"a"} and "near chance" in result.dropped["b"]
    stored = json.loads((tmp_path / "s" / "best_heads.json").read_text())
    assert stored["heads"]["a"]["kind"] == "conv_linear"  # the concrete architecture, rebuilt without NNI
    best = stored["layers"][0]["best"]
    assert stored["heads"]["a"] == SpaceConfig(**SMALL["space"]).spec(best["choices"], (4, 6, 6))
    assert load_search(tmp_path / "s").heads == result.heads
    ee = SimpleNamespace(candidates=list(CANDS))
    assert apply_search(ee, tmp_path / "s") == result.heads and [c.name for c in ee.candidates] == ["a"]
    with pytest.raises(ValueError, match="searched on candidates"):
        apply_search(SimpleNamespace(candidates=[CANDS[0]]), tmp_path / "s")


def test_failing_trials_are_logged_and_the_search_goes_on(medial, tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake(calls, fail_when=lambda spec: spec["pool"] == 2))
    result = run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 6}, tmp_path / "s", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "s" / "layers" / "a" / "history.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("out of memory (simulated)" in r["error"] for r in failed)
    assert any(r["status"] == "trained" for r in rows) and result.layers[0].best["spec"]["pool"] == 1
    assert "failed" in caplog.text


def test_interrupted_search_resumes_without_retraining(medial, tmp_path, monkeypatch):
    out = tmp_path / "s"
    calls = []
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake(calls, interrupt_at=3))
    with pytest.raises(KeyboardInterrupt):
        run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 5}, out, progress=False)
    history = out / "layers" / "a" / "history.jsonl"
    done = [json.loads(line)["spec"] for line in history.read_text().splitlines()]
    assert len(done) == 2 and not (out / "best_heads.json").exists()
    again = []
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake(again))
    result = run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 5}, out, progress=False)
    assert not any(spec in again for spec in done)  # answered from the history, not retrained
    assert len(history.read_text().splitlines()) == 5 and result.layers[0].trials == 5
    # A finished layer is not searched again; a larger budget continues it.
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake([], fail_when=lambda spec: True))
    assert run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 5}, out, progress=False).heads == result.heads
    more = []
    monkeypatch.setattr(search_mod, "_train_and_measure", _fake(more))
    assert run_search(medial, CANDS[:1], 5, {**SMALL, "trials_per_layer": 5}, out, trials=7,
                      progress=False).layers[0].trials == 7
    assert len(more) <= 2
    with pytest.raises(ValueError, match="config.training"):
        run_search(medial, CANDS[:1], 5, {**SMALL, "training": {"epochs": 2}}, out, progress=False)


# ---- the real shared model and images -----------------------------------------------------------------------

def test_search_fit_save_load_on_the_real_model(shared, tmp_path):
    model, info = load_backbone("cifar_resnet20")
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=200, seed=2)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=3)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=100), tmp_path / "medial", augment_copies=1,
               progress=False)
    config = {**load_config(SPACES / "linear.yaml").to_dict(), "trials_per_layer": 2,
              "training": {"epochs": 1, "max_rows": 100}}
    result = ee.search(config, tmp_path / "search", progress=False)
    assert len(result.layers) == 3 and result.heads
    # a few rows and one epoch: searched heads may sit at the near-chance bar, so keep every head
    ee.fit(0.05, heads=apply_search(ee, tmp_path / "search"), method="joint", near_chance_margin=-1,
           progress=False)
    assert all(ee.head_specs[name]["kind"] == "conv_linear" for name in ee.heads)
    ee.save(tmp_path / "bundle")
    loaded = selfxit.load(tmp_path / "bundle", model)
    x = torch.stack([traffic[i][0] for i in range(8)])
    ee.thresholds = loaded.thresholds = {name: 0.0 for name in ee.heads}  # every sample exits at the first head
    assert torch.equal(ee(x).logits, loaded(x).logits)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "selfxit", *args], capture_output=True, text=True,
                          env={**os.environ, "NNI_FRAMEWORK": "none"}, timeout=600)


@pytest.mark.slow
def test_cli_search_then_enable(shared, tmp_path):
    data = str(shared / "data" / "cifar10-test")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  conv_layers: [0]\n  pool: [1]\nstrategy: annealing\n")
    proc = _cli("search", "--config", str(bad), "--model", "cifar_resnet20", "--data", data, "--out",
                str(tmp_path / "never"))
    assert proc.returncode == 2 and "annealing" in proc.stderr and "random, grid, evolution, tpe" in proc.stderr
    assert not (tmp_path / "never").exists()
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"space": {"conv_layers": [0], "pool": [2, 4], "linear_layers": [1]},
                                  "training": {"epochs": 10, "max_rows": 1000}, "objective": {"drop_margin": 0.0}}))
    common = ["--model", "cifar_resnet20", "--data", data, "--max-samples", "300", "--max-candidates", "2",
              "--augment", "1"]
    proc = _cli("search", "--config", str(config), "--out", str(tmp_path / "s"), "--trials", "1", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best_heads.json" in proc.stdout
    proc = _cli("enable", "--search", str(tmp_path / "s"), "--tolerance", "0.05", "--out", str(tmp_path / "b"),
                *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {e["spec"]["kind"] for e in manifest["exits"]} == {"conv_linear"}


def test_a_kept_layer_returns_a_head_that_clears_the_near_chance_bar(medial, tmp_path, monkeypatch):
    """The best-score trial can sit below the bar (a cheap, weak head); a kept layer must return one that clears it."""
    def train(model, job):
        wide = bool(model.spec["hidden"])  # big head: clears the bar; small head: scores higher but near chance
        agreement, flops = (0.9, 8 * 10**6) if wide else (0.2, 100)
        score = agreement - flops / 10**7
        return {"spec": model.spec, "head_flops": flops, "head_params": 10, "cached": False, "default": score,
                "status": "trained", "agreement": agreement, "seconds": 0.0}
    monkeypatch.setattr(search_mod, "_train_and_measure", train)
    config = {**SMALL, "trials_per_layer": 12, "objective": {"max_head_flops": 1.0}}
    result = run_search(medial, CANDS[:1], 5, config, tmp_path / "s", progress=False)
    layer = result.layers[0]
    rows = [json.loads(line) for line in (tmp_path / "s" / "layers" / "a" / "history.jsonl").read_text().splitlines()]
    assert {r["agreement"] for r in rows} == {0.2, 0.9}  # both kinds were tried
    assert max(rows, key=lambda r: r["score"])["agreement"] == 0.2  # the best score is the near-chance head
    assert layer.kept and layer.best["agreement"] >= layer.majority + 0.05
    assert result.heads["a"]["hidden"]  # the stored head is the one that clears the bar
