"""Learned exit gates vs the confidence cascade vs the oracle gate, same heads, shared ResNet-56 + CIFAR-10.

    .venv/bin/python benchmarks/gates.py [--medial DIR] [--out DIR] [--lams 0.5,1,2,4,8,inf]
                                         [--eval-samples N] [--latency-samples N]

``--medial`` reuses a recorded medial dataset of ResNet-56 on all shared images (else one is recorded into
a temporary folder, ~2 min); the whole run takes ~35 min on a shared 2-core CPU. For tolerance 1% and 5% it
prints, on the held-back test split: flops_fraction and agreement from the recorded predictions and from running the early-exit model, latency ratios (early-exit /
backbone wall time, same run), the oracle gate (each sample leaves at the cheapest agreeing head) with the
same heads, gate FLOPs against head FLOPs, conformal coverage and set size, and the trade-off over the
gates' cost weight lambda. Writes ``gates.json`` and ``gates.png`` into ``--out`` (default: a folder in the
system temp dir).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.fit import conformal, gates
from selfxit.fit import select as optimize  # noqa: E402
from selfxit.fit.distill import head_logits  # noqa: E402
from selfxit.fit.medial import MedialDataset  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, default_traffic_dir, split_indices  # noqa: E402

TOLERANCES = (0.01, 0.05)
TARGETS = {0.01: (0.990, 0.70), 0.05: (0.950, 0.55)}  # learned gates: agreement >=, flops_fraction <=


def recorded(ee, medial: MedialDataset, split: str, layers: list[str] | None = None):
    """(log-probs [A, N, C] of the active exits, ExitStats of the cascade as the runtime scores it, backbone top-1).

    ``layers``: score these exits instead of the active ones (for learned gates: a chain they were fitted for).
    """
    rows = medial.indices(split)
    top1 = medial.teacher(rows).argmax(1)
    layers = list(ee.thresholds) if layers is None else layers
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    lp = torch.stack([(head_logits(ee.heads[n], medial, n, rows) / ee.temperatures[n]).log_softmax(1) for n in layers]) \
        if layers else torch.zeros(0, len(rows), ee.num_classes)
    if ee.gate == "learned":
        scores = gates.chain_scores([ee.gates[n] for n in layers], lp)
        extra = [ee.gates[n].flops() for n in layers]
    else:
        scores, extra = lp.exp().max(2).values.double().numpy(), [0] * len(layers)
    stats = optimize.ExitStats(scores, (lp.argmax(2) == top1[None]).numpy(),
                               [ee.head_flops[n] + e for n, e in zip(layers, extra)], [remaining[n] for n in layers],
                               ee.backbone_flops)
    return lp, stats, top1


def oracle_flops(ee, medial: MedialDataset, split: str, layers: list[str]) -> float:
    """FLOPs fraction when every sample leaves at the cheapest of ``layers`` whose head agrees with the backbone
    (all of those heads run until then); agreement is 1 by construction."""
    if not layers:
        return 1.0
    rows = medial.indices(split)
    top1 = medial.teacher(rows).argmax(1).numpy()
    agree = np.stack([head_logits(ee.heads[n], medial, n, rows).argmax(1).numpy() == top1 for n in layers])
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    heads = np.cumsum([ee.head_flops[n] for n in layers])
    at = ee.backbone_flops - np.array([remaining[n] for n in layers]) + heads
    first = np.where(agree.any(0), agree.argmax(0), -1)
    cost = np.where(first >= 0, at[np.maximum(first, 0)], ee.backbone_flops + heads[-1])
    return float(cost.mean() / ee.backbone_flops)


def hindsight_flops(ee, medial: MedialDataset, tolerance: float) -> float:
    """The cheapest cascade over all kept heads (any number of exits) whose drop on the test split itself stays
    within the tolerance, thresholds tuned on the test split by the joint optimizer: what the scores could give
    with perfect threshold knowledge (not achievable). Learned gates are refitted for the chain of all heads."""
    layers = list(ee.heads)
    if not layers:
        return 1.0
    if ee.gate == "learned":
        raw = dict(ee.report.gate_config)
        config = gates.GateConfig(**{**raw, "lam": math.inf if raw["lam"] == "inf" else raw["lam"]})
        lp, top1 = {}, {}
        for split in ("tune", "test"):
            rows = medial.indices(split)
            top1[split] = medial.teacher(rows).argmax(1)
            lp[split] = torch.stack([(head_logits(ee.heads[n], medial, n, rows) / ee.temperatures[n]).log_softmax(1)
                                     for n in layers])
        remaining = {c.name: c.remaining_flops for c in ee.candidates}
        flops = ([ee.head_flops[n] for n in layers], [remaining[n] for n in layers], ee.backbone_flops)
        fit = gates.GateFit(list(range(len(layers))),
                            gates.train_chain(lp["tune"], top1["tune"], gates.exit_costs(*flops), config), 1)
        stats = fit.stats(lp["test"], top1["test"], *flops)
    else:
        _, stats, _ = recorded(ee, medial, "test", layers)
    starts = [optimize.best_subset(stats, tolerance), np.full(len(layers), optimize.OFF)]
    return optimize.best_within(optimize.joint_path(stats, starts), tolerance).flops_fraction


def resampled_coverage(ee, medial: MedialDataset, rounds: int = 200, seed: int = 0) -> dict:
    """Coverage of per-exit split-conformal sets over random re-draws of calibration (val-sized) and evaluation
    samples from val + test, cascade fixed: how far one split's coverage wanders from 1 - alpha."""
    lps, taken, tops = [], [], []
    for split in ("val", "test"):
        lp, stats, top1 = recorded(ee, medial, split)
        lps.append(lp), taken.append(optimize.exit_assignment(stats, stats_thresholds(ee))), tops.append(top1)
    lp, taken, top1 = torch.cat(lps, 1), np.concatenate(taken), torch.cat(tops)
    n_cal = len(medial.indices("val"))
    rng = np.random.default_rng(seed)
    layers, active = list(ee.thresholds), list(range(len(ee.thresholds)))
    out = {str(a): [] for a in conformal.ALPHAS}
    for _ in range(rounds):
        perm = rng.permutation(len(taken))
        cal, ev = perm[:n_cal], perm[n_cal:]
        calibration = conformal.calibrate_cascade(layers, active, lp[:, cal], taken[cal], top1[cal])
        quality = conformal.cascade_set_quality(calibration, layers, active, lp[:, ev], taken[ev], top1[ev])
        for a, q in quality.items():
            out[a].append(q.coverage_early)
    return {a: {"mean": float(np.mean(v)), "sd": float(np.std(v)),
                "within_1_point": float(np.mean(np.abs(np.array(v) - (1 - float(a))) <= 0.01))} for a, v in out.items()}


def stats_thresholds(ee) -> np.ndarray:
    return np.array(list(ee.thresholds.values()), dtype=np.float64)


def _lam(config):
    return None if config is None else ("inf" if math.isinf(config.lam) else config.lam)


def run_cascade(ee, medial, test_loader, tolerance, config, latency_samples, evaluate_runtime=True):
    """Fit (confidence cascade when ``config`` is None, else learned gates) and measure it on the test split."""
    start = time.perf_counter()
    gate = "confidence" if config is None else "learned"
    report = ee.fit(tolerance, gate=gate, gate_config=config, progress=False)
    fit_s = time.perf_counter() - start
    _, test_stats, _ = recorded(ee, medial, "test")
    rec = optimize.evaluate_cascade(test_stats, stats_thresholds(ee))
    row = {"gate": gate, "lam": _lam(config), "previous": bool(config and config.previous), "exits": list(ee.thresholds),
           "thresholds": list(ee.thresholds.values()), "fit_seconds": fit_s,
           "recorded_test": {"flops_fraction": rec.flops_fraction, "agreement": 1 - rec.drop},
           "recorded_val": {"flops_fraction": report.chosen_val.flops_fraction, "agreement": report.chosen_val.agreement},
           "confidence_level": report.confidence_level,
           "prediction_sets_test": {a: asdict(q) for a, q in report.prediction_sets.items()},
           "oracle_same_exits": oracle_flops(ee, medial, "test", list(ee.thresholds)),
           "hindsight_test": hindsight_flops(ee, medial, tolerance) if evaluate_runtime else None,
           "gate_flops_over_head_flops": {n: ee.gates[n].flops() / ee.head_flops[n] for n in ee.thresholds}
           if gate == "learned" else {}}
    if gate == "learned":
        row["gate_chain"] = list(ee.gates)
    if evaluate_runtime:
        result = evaluate(ee, test_loader, latency_samples=latency_samples, progress=False)
        row["runtime_test"] = {k: getattr(result, k) for k in ("num_samples", "flops_fraction", "agreement",
                                                              "accuracy_backbone", "accuracy_early_exit",
                                                              "latency_ratio_b1", "latency_ratio_b32", "backbone_ms_b1")}
        row["conformal_resampled"] = resampled_coverage(ee, medial)
    path = optimize.scaled_path(test_stats, stats_thresholds(ee), np.linspace(0.0, 3.0, 61)) if ee.thresholds else []
    row["test_curve"] = [(r.flops_fraction, 1 - r.drop) for r in path]
    return row


def _fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_tolerance(tolerance, rows, oracle_all):
    agreement_bar, flops_bar = TARGETS[tolerance]
    print(f"\n=== tolerance {tolerance:.0%} (held-back test split; promise at {rows[0]['confidence_level']:.0%} confidence) ===")
    print(f"{'cascade':<24}{'exits':<34}{'flops':>7}{'agree':>8}{'rt flops':>9}{'rt agree':>9}{'lat b1':>8}{'lat b32':>8}"
          f"{'oracle':>8}{'hindsight':>10}")
    for r in rows:
        name = r["gate"] + ("+prev" if r["previous"] else "") + (f" (lam {r['lam']})" if r["gate"] == "learned" else "")
        rt = r.get("runtime_test", {})
        print(f"{name:<24}{','.join(r['exits']) or 'none':<34}{r['recorded_test']['flops_fraction']:>7.3f}"
              f"{r['recorded_test']['agreement']:>8.4f}{_fmt(rt.get('flops_fraction')):>9}{_fmt(rt.get('agreement'), '.4f'):>9}"
              f"{_fmt(rt.get('latency_ratio_b1')):>8}{_fmt(rt.get('latency_ratio_b32')):>8}{r['oracle_same_exits']:>8.3f}"
              f"{_fmt(r['hindsight_test']):>10}")
    print(f"{'oracle gate, all heads':<58}{oracle_all:>7.3f}{1.0:>8.4f}")
    print("flops/agree: recorded test predictions; rt: the early-exit model run on the test images; lat: latency ratio;"
          "\noracle: each sample at the cheapest agreeing head among the cascade's exits; hindsight: the same scores' "
          "cheapest cascade (all heads) within the tolerance, thresholds tuned on the test split itself")
    learned = next(r for r in rows if r["gate"] == "learned")
    ok = learned["recorded_test"]["agreement"] >= agreement_bar and learned["recorded_test"]["flops_fraction"] <= flops_bar
    print(f"target (learned): agreement >= {agreement_bar} and flops <= {flops_bar}: {'PASS' if ok else 'MISS'}")
    ratios = learned["gate_flops_over_head_flops"]
    if ratios:
        print(f"gate FLOPs / head FLOPs: max {max(ratios.values()):.4%} (target < 2%)")
    for r in rows:
        for a, q in r["prediction_sets_test"].items():
            resampled = r.get("conformal_resampled", {}).get(a)
            extra = (f"; over 200 re-drawn val/test splits {resampled['mean']:.4f} +- {resampled['sd']:.4f}, "
                     f"within 1 point in {resampled['within_1_point']:.0%}") if resampled else ""
            print(f"  sets {r['gate'] + ('+prev' if r['previous'] else ''):<13} alpha {a:<5} coverage (early answers) {_fmt(q['coverage_early'], '.4f')} "
                  f"size {_fmt(q['mean_size_early'], '.2f')} empty {_fmt(q['empty_early'], '.3f')} "
                  f"(n {q['early_samples']}; all answers {_fmt(q['coverage_all'], '.4f')}){extra}")


def plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"confidence": "tab:blue", "learned": "tab:orange", "learned+prev": "tab:red"}
    for t, run in results["runs"].items():
        style = "-" if float(t) == 0.01 else "--"
        for r in run["cascades"]:
            kind = r["gate"] + ("+prev" if r["previous"] else "")
            if r["test_curve"]:
                f, a = zip(*r["test_curve"])
                ax1.plot(f, a, style, color=colors[kind], alpha=0.7, label=f"{kind} family designed at {float(t):.0%}")
            ax1.plot(r["recorded_test"]["flops_fraction"], r["recorded_test"]["agreement"], "o", color=colors[kind])
        ax1.plot(run["oracle_all_heads"], 1.0, "*", color="tab:green", markersize=12,
                 label="oracle gate (all heads)" if float(t) == 0.01 else None)
        sweep = run["lambda_sweep"]
        lams = [r["lam"] if r["lam"] != "inf" else 1e3 for r in sweep]
        ax2.plot(lams, [r["recorded_test"]["flops_fraction"] for r in sweep], "o" + style, label=f"flops, tol {float(t):.0%}")
        for r, x in zip(sweep, lams):
            ax2.annotate(f"{r['recorded_test']['agreement']:.3f}", (x, r["recorded_test"]["flops_fraction"]),
                         fontsize=7, textcoords="offset points", xytext=(0, 5))
        conf = next(r for r in run["cascades"] if r["gate"] == "confidence")
        ax2.axhline(conf["recorded_test"]["flops_fraction"], linestyle=style, color="tab:blue", alpha=0.5,
                    label=f"confidence cascade, tol {float(t):.0%}")
    ax1.set(xlabel="FLOPs fraction (test)", ylabel="agreement with backbone (test)", ylim=(0.9, 1.001),
            title="trade-off on the held-back test split (dots: certified)")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.set(xscale="log", xlabel="lambda (cost weight of gate targets; 1000 = inf)", ylabel="FLOPs fraction (test)",
            title="learned gates over lambda (labels: test agreement)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medial", type=Path, help="recorded medial dataset of ResNet-56 on all shared images")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "selfxit-gates-benchmark")
    parser.add_argument("--lams", default="0.5,1,2,4,8,16,inf", help="lambda values of the trade-off sweep")
    parser.add_argument("--eval-samples", type=int, default=None, help="test images run through the runtime (default all)")
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lams = [math.inf if v.strip() == "inf" else float(v) for v in args.lams.split(",")]

    model, info = load_backbone("cifar_resnet56")
    traffic = ImageFolderData(default_traffic_dir(), info, seed=args.seed)
    test_idx = split_indices(len(traffic), args.seed)["test"]
    if args.eval_samples:
        test_idx = test_idx[:args.eval_samples]
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(traffic, test_idx.tolist()), batch_size=64)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    tmp = None
    if args.medial:
        ee.medial = MedialDataset(args.medial)
        names = [c.name for c in ee.candidates]
        if ee.medial.candidates != names or ee.medial.meta.num_samples < len(traffic) or ee.medial.meta.seed != args.seed:
            raise SystemExit(f"{args.medial} was recorded for candidates {ee.medial.candidates} (seed "
                             f"{ee.medial.meta.seed}); this run needs {names} on all {len(traffic)} images, seed {args.seed}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="selfxit-gates-"))
        ee.collect(torch.utils.data.DataLoader(traffic, batch_size=256, num_workers=2), tmp, seed=args.seed)
    medial_test = np.sort(np.asarray(ee.medial.source)[ee.medial.indices("test")])
    assert np.array_equal(medial_test, split_indices(len(traffic), args.seed)["test"]), "medial test split != image split"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"num_samples": len(traffic), "test_samples": int(len(medial_test)),
               "runtime_test_samples": int(len(test_idx)), "default_gate_config": gates.config_dict(gates.GateConfig()),
               "runs": {}}
    try:
        for tolerance in TOLERANCES:
            cascades = [run_cascade(ee, ee.medial, test_loader, tolerance, config, args.latency_samples)
                        for config in (None, gates.GateConfig(), gates.GateConfig(previous=True))]
            oracle_all = oracle_flops(ee, ee.medial, "test", list(ee.heads))
            sweep = []
            for lam in lams:
                r = run_cascade(ee, ee.medial, test_loader, tolerance, gates.GateConfig(lam=lam),
                                args.latency_samples, False)
                sweep.append(r)
                print(f"  tol {tolerance:.0%} lambda {r['lam']}: test flops {r['recorded_test']['flops_fraction']:.3f} "
                      f"agreement {r['recorded_test']['agreement']:.4f} exits {r['exits']}", flush=True)
            results["runs"][str(tolerance)] = {"cascades": cascades, "oracle_all_heads": oracle_all, "lambda_sweep": sweep}
            print_tolerance(tolerance, cascades, oracle_all)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    (args.out / "gates.json").write_text(json.dumps(results, indent=1, default=float))
    plot(results, args.out / "gates.png")
    print(f"\nwrote {args.out / 'gates.json'} and {args.out / 'gates.png'}")


if __name__ == "__main__":
    main()
