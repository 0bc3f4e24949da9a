"""The evaluation report on a small real bundle (shared CIFAR ResNet-20): files, numbers, and the CLI."""
import argparse
import contextlib
import io
import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

import selfxit
from selfxit.cli.report import add_parser
from selfxit.core.hooks import capture, split_batch
from selfxit.core.provenance import Provenance
from selfxit.evaluate import report as report_mod
from selfxit.evaluate.evaluation import evaluate
from selfxit.fit.calibrate import expected_calibration_error
from selfxit.fit.distill import DistillConfig
from selfxit.fit.gates import chain_scores
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData, split_indices

SEED, SAMPLES = 2, 300


@pytest.fixture(scope="module")
def built(shared, slow_setup, tmp_path_factory):
    """A saved bundle, its report written by ``selfxit report`` (test split), and evaluate() on the same split.

    One intra-op thread: on a shared 2-core machine, OpenMP waits make multi-threaded small batches ~10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _build(shared, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _build(shared, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = shared / "data" / "cifar10-test"
    model, info = load_backbone("cifar_resnet20")
    dataset = ImageFolderData(data, info, max_samples=SAMPLES, seed=SEED)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=3)
    ee.collect(torch.utils.data.DataLoader(dataset, batch_size=100), root / "medial", seed=SEED, augment_copies=1,
               progress=False)
    ee.fit(0.05, distill=DistillConfig(epochs=3), method="joint", progress=False)
    ee.provenance = Provenance(model="cifar_resnet20", seed=SEED, max_samples=SAMPLES, num_samples=len(dataset))
    bundle = ee.save(root / "bundle")

    parser = argparse.ArgumentParser(prog="selfxit")
    add_parser(parser.add_subparsers(dest="command"))
    out = root / "out"
    args = parser.parse_args(["report", "--bundle", str(bundle), "--model", "cifar_resnet20", "--data", str(data),
                              "--out", str(out), "--latency-samples", "16"])
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(report_mod, "BATCH_SIZES", (1, 8))
        args.func(args)
    result = json.loads((out / "report.json").read_text())

    ee = selfxit.load(bundle, load_backbone("cifar_resnet20")[0])
    rows = split_indices(len(dataset), SEED)["test"]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows.tolist()), batch_size=64)
    evaluation = evaluate(ee, loader, latency=False, progress=False)
    return {"ee": ee, "bundle": bundle, "out": out, "result": result, "evaluation": evaluation, "args": args,
            "stdout": stdout.getvalue(), "loader": loader}


def _close(a, b):
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= 1e-9


def test_html_references_existing_images_and_works_offline(built):
    page = (built["out"] / "index.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert len(sources) >= 4
    for src in sources:
        assert not src.startswith(("http:", "https:", "/")) and (built["out"] / src).is_file()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page


def test_report_json_matches_evaluate(built):
    summary, ev = built["result"]["summary"], built["evaluation"]
    assert summary["num_samples"] == ev.num_samples == 90
    for key in ("flops_fraction", "agreement", "accuracy_backbone", "accuracy_early_exit"):
        assert _close(summary[key], getattr(ev, key)), key
    for key in ("exit_rates", "exit_agreement", "exit_accuracy"):
        assert list(summary[key]) == list(getattr(ev, key))
        assert all(_close(summary[key][n], getattr(ev, key)[n]) for n in summary[key]), key


def test_evaluate_with_known_backbone_answers(built):
    ee, loader = built["ee"], built["loader"]
    with torch.inference_mode():
        reference = torch.cat([ee.backbone(x).argmax(1) for x, *_ in loader])
    again = evaluate(ee, loader, latency=False, progress=False, reference=reference)
    same = json.dumps(asdict(again), sort_keys=True) == json.dumps(asdict(built["evaluation"]), sort_keys=True)
    assert same  # the same figures without running the backbone as reference
    flipped = evaluate(ee, loader, latency=False, progress=False, reference=(reference + 1) % 10)
    assert flipped.agreement < built["evaluation"].agreement  # the given answers are what agreement is scored on
    with pytest.raises(ValueError, match="reference holds"):
        evaluate(ee, loader, latency=False, progress=False, reference=reference[:-1])
    with pytest.raises(ValueError, match="reference holds"):
        evaluate(ee, loader, latency=False, progress=False, reference=torch.cat([reference, reference[:1]]))


def test_per_exit_curves_and_collaborative_table(built):
    result, ee = built["result"], built["ee"]
    assert list(result["per_exit"]) == [c.name for c in ee.candidates if c.name in ee.heads]  # every head
    for curve in result["per_exit"].values():
        assert len(curve["hit_rate"]) == len(curve["agreement"]) == len(curve["accuracy"]) == 101
        assert curve["hit_rate"][0] == 1.0 and all(np.diff(curve["hit_rate"]) <= 0)
    table = result["collaborative"]
    assert [r["exit"] for r in table] == list(ee.thresholds) + ["final"]
    summary = result["summary"]
    effect = sum(r["accuracy_effect"] for r in table)
    assert abs(effect - (summary["accuracy_early_exit"] - summary["accuracy_backbone"])) < 1e-9


def test_tradeoff_curve_and_budgets(built):
    result = built["result"]
    points = result["tradeoff"]["points"]
    assert len(points) == 100
    assert all(0 <= p["flops_fraction"] <= 1.1 and 0 <= p["agreement"] <= 1 and 0 <= p["accuracy"] <= 1
               for p in points)
    budgets = result["budgets"]
    assert [b["budget"] for b in budgets] == [0.25, 0.5, 0.75, 1.0]
    for b in budgets:
        assert b["flops_fraction"] is None or b["flops_fraction"] <= b["budget"] + 1e-12
    assert budgets[-1]["accuracy"] >= result["summary"]["accuracy_backbone"]  # the backbone itself fits 100%


def test_calibration_cost_and_latency(built):
    result, ee = built["result"], built["ee"]
    assert set(result["calibration"]) == set(ee.heads)
    for c in result["calibration"].values():
        assert 0 <= c["ece_before"] <= 1 and 0 <= c["ece_after"] <= 1
    cost = result["cost"]
    assert cost["flops"]["backbone_per_sample"] == ee.backbone_flops
    assert cost["disk_bytes"]["bundle_total"] == sum(p.stat().st_size for p in built["bundle"].iterdir())
    memory = cost["memory_bytes"]
    assert memory["backbone"] > 0 and memory["heads_all"] >= memory["heads_active"] > 0
    assert memory["early_exit_total"] == memory["backbone"] + memory["heads_active"]
    assert [p["batch_size"] for p in cost["peak_live_bytes"]["batches"]] == [1, 8]
    assert all(p["backbone"] > 0 and p["early_exit"] > 0 for p in cost["peak_live_bytes"]["batches"])
    cpu = result["latency"]["cpu"]
    assert [r["batch_size"] for r in cpu] == [1, 8] and [r["batches"] for r in cpu] == [16, 2]
    for r in cpu:
        for which in ("backbone", "early_exit"):
            s = r[which]
            assert 0 < s["latency_p50_ms"] <= s["latency_p99_ms"] and s["ms_per_sample"] > 0


def test_reliability_ece_matches_calibrate():
    probs = torch.softmax(3 * torch.randn(500, 10, generator=torch.Generator().manual_seed(0)), 1)
    top1 = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(1))
    conf, pred = probs.max(1)
    ours = report_mod.reliability(conf.numpy(), (pred == top1).numpy())
    assert abs(ours["ece"] - expected_calibration_error(probs, top1)) < 1e-6
    assert sum(ours["count"]) == 500


def test_peak_live_bytes_counts_temporaries():
    x = torch.ones(1000)  # 4000 bytes, allocated before: not counted
    assert report_mod.peak_live_bytes(lambda t: (t * 2) + 1, x) == 8000  # t * 2 is alive while + 1 allocates
    assert report_mod.peak_live_bytes(lambda t: t.view(10, 100).relu_(), x) == 0  # views / in-place: no new storage


def test_unlabelled_inputs(built, tmp_path):
    ee = built["ee"]
    inputs = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    result = report_mod.build_report(ee, inputs, None, tmp_path, latency_samples=1, batch_sizes=[1], progress=False)
    assert result["summary"]["accuracy_backbone"] is None and result["summary"]["num_samples"] == 6
    assert all(p["accuracy"] is None for p in result["tradeoff"]["points"])
    assert (tmp_path / "index.html").is_file()
    assert json.loads((tmp_path / "report.json").read_text()) == result


def test_cli_report_uses_the_bundle_split(built):
    args = built["args"]
    assert args.split == "test" and args.seed is None and args.max_samples is None  # defaults come from the bundle
    assert str(built["out"] / "index.html") in built["stdout"]
    info = built["result"]["info"]
    assert info["split"] == "test" and info["seed"] == SEED and info["max_samples"] == SAMPLES


def test_latency_alternates_and_can_time_the_backbone_alone():
    calls = []
    backbone = lambda x, cb: calls.append(("backbone", len(x)))  # noqa: E731
    early = lambda x, cb: calls.append(("early_exit", len(x)))  # noqa: E731
    rows = report_mod.measure_latency(backbone, early, torch.zeros(5, 2), [1, 4], 4, progress=False)
    assert [r["batches"] for r in rows] == [4, 1] and all(r["ratio_mean_latency"] > 0 for r in rows)
    assert [c[0] for c in calls[2:10]] == ["backbone", "early_exit", "early_exit", "backbone"] * 2  # after warm-up
    alone = report_mod.measure_latency(backbone, None, torch.zeros(5, 2), [2], 2, progress=False)
    assert "early_exit" not in alone[0] and alone[0]["backbone"]["ms_per_sample"] > 0


# ---- learned gates: the report must describe the rule the runtime runs ---------------------------------------

@pytest.fixture(scope="module")
def gated(shared, slow_setup, tmp_path_factory):
    """A learned-gate model on ResNet-20, its report on the test split, and evaluate() on the same rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, info = load_backbone("cifar_resnet20")
        dataset = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=500, seed=SEED)
        ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=3)
        ee.collect(torch.utils.data.DataLoader(dataset, batch_size=125), tmp_path_factory.mktemp("gated-medial"),
                   seed=SEED, augment_copies=1, progress=False)
        ee.fit(0.1, distill=DistillConfig(epochs=3), gate="learned", max_exits=None, progress=False)
        assert ee.gate == "learned" and ee.gates, "the fit kept no gated exit to report on"
        if not ee.thresholds:  # nothing certified on so few samples: run the whole gated chain
            ee.thresholds = {name: 0.5 for name in ee.gates}
        rows = split_indices(len(dataset), SEED)["test"]
        out = tmp_path_factory.mktemp("gated-report")
        result = report_mod.build_report(ee, dataset, rows, out, latency_samples=1, batch_sizes=[1], progress=False)
        subset = torch.utils.data.Subset(dataset, rows.tolist())
        evaluation = evaluate(ee, torch.utils.data.DataLoader(subset, batch_size=64), latency=False, progress=False)
        yield {"ee": ee, "result": result, "evaluation": evaluation, "subset": subset}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # builds its fixture through request.getfixturevalue
@pytest.mark.parametrize("which", ["built", "gated"])
def test_operating_point_is_what_evaluate_measures(which, request):
    """The trade-off curve's numbers at the bundle's own thresholds are the runtime's: same exits, same FLOPs."""
    case = request.getfixturevalue(which)
    point, ev = case["result"]["tradeoff"]["bundle"], case["evaluation"]
    assert list(point["exit_rates"]) == list(ev.exit_rates)
    assert all(_close(point["exit_rates"][n], ev.exit_rates[n]) for n in ev.exit_rates), (point, ev.exit_rates)
    assert _close(point["flops_fraction"], ev.flops_fraction) and _close(point["agreement"], ev.agreement)
    assert _close(point["accuracy"], ev.accuracy_early_exit)
    if which == "gated":
        assert ev.exit_rates["final"] < 1.0  # some samples do leave early: the check means something


def test_learned_gate_curves_read_the_gate_scores(gated):
    """Per-exit curves of gated exits are hit rates of the gate score (gate k reads gate k - 1's exit), and an
    exit's cost includes its gate."""
    ee, curves = gated["ee"], gated["result"]["per_exit"]
    chain = list(ee.gates)
    with torch.inference_mode():
        scores = []
        for x, *_ in torch.utils.data.DataLoader(gated["subset"], batch_size=64):
            with capture(ee.backbone, chain) as acts:
                ee.backbone(x)
            log_probs = torch.stack([(ee.heads[n](acts[n]) / ee.temperatures[n]).log_softmax(1) for n in chain])
            scores.append(chain_scores([ee.gates[n] for n in chain], log_probs))
    scores = np.concatenate(scores, axis=1)
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    for k, name in enumerate(chain):
        curve = curves[name]
        assert curve["score"] == "gate"
        expected = (scores[k][None] >= np.array(curve["thresholds"])[:, None]).mean(1)
        assert np.abs(np.array(curve["hit_rate"]) - expected).max() <= 1.5 / scores.shape[1]  # a rounding flip at most
        cost = ee.backbone_flops - remaining[name] + ee.head_flops[name] + ee.gates[name].flops()
        assert curve["flops_fraction_at_exit"] == pytest.approx(cost / ee.backbone_flops, rel=1e-12)
    assert all(c["score"] == "confidence" for n, c in curves.items() if n not in ee.gates)
    assert "gate" in gated["result"]["tradeoff"]["family"]


# ---- shared pieces: hooks and batches -------------------------------------------------------------------------

def test_capture_removes_its_hooks_even_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with capture(model, ["0", "2"]) as acts:
        out = model(torch.ones(5, 3))
    assert acts["0"].shape == (5, 4) and torch.equal(acts["2"], out)
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["1"]):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="not modules"), capture(model, ["nope"]):
        pass


def test_split_batch():
    x, y = torch.zeros(2, 3), torch.tensor([1, 2])
    for batch in (x, [x]):
        inputs, labels = split_batch(batch)
        assert inputs is x and labels is None
    inputs, labels = split_batch((x, y, "path"))
    assert inputs is x and labels is y
    assert split_batch([x, ["a", "b"]])[1] is None  # a second field that is not a tensor is not labels
    with pytest.raises(TypeError, match="a batch must be"):
        split_batch({"x": x})
