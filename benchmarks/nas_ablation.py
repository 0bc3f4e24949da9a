"""NAS ablation on the shared ResNet-56 and CIFAR-10 images at tolerance 1% (the SelfXit paper's Appendix D).

    .venv/bin/python benchmarks/nas_ablation.py [--medial DIR] [--search DIR] [--trials 20] [--json out.json]

Compares, all from one run on the same medial dataset and the held-back test split:

- default:  the project's default heads (pool + MLP) at every candidate;
- searched: the heads found by ``selfxit search`` with search_spaces/conv_linear.yaml (near-chance
            layers dropped);
- no-NAS:   one fixed head of the same space at every candidate (the middle value of every choice:
            1 conv of 32 channels, kernel 3, stride 2, pool to 4x4, one hidden layer of 128).

For each: flops_fraction, agreement and accuracy on the test images, latency ratios (early-exit /
backbone wall time, batch 1 and 32, same run), active exits, and the parameters and FLOPs of the active
heads. ``--medial`` reuses a recorded medial dataset of the same model (default: record one, about
2 minutes); ``--search`` keeps the search folder (a finished one is reused, an interrupted one resumed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.api import EarlyExitModel  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.fit.medial import MedialDataset  # noqa: E402
from selfxit.search.config import load_config  # noqa: E402
from selfxit.search.run import apply_search, load_search  # noqa: E402
from selfxit.settings import PROJECT_ROOT  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, default_traffic_dir, split_indices  # noqa: E402

TOLERANCE = 0.01


def _fresh(base: EarlyExitModel, medial: MedialDataset) -> EarlyExitModel:
    ee = EarlyExitModel(base.backbone, base.input_shape, base.num_classes, base.candidates, base.backbone_flops)
    ee.medial = medial
    return ee


def _medial(ee: EarlyExitModel, args, traffic, scratch: Path) -> MedialDataset:
    if args.medial:
        medial = MedialDataset(args.medial)
        ours = [(c.name, tuple(c.shape)) for c in ee.candidates]
        theirs = list(zip(medial.candidates, medial.meta.shapes))
        if ours != theirs or medial.meta.seed != args.seed:
            raise SystemExit(f"--medial {args.medial} was recorded for other candidates or seed: {theirs}, "
                             f"seed {medial.meta.seed}; this run needs {ours}, seed {args.seed}")
        return medial
    loader = torch.utils.data.DataLoader(traffic, batch_size=256, num_workers=2)
    return ee.collect(loader, out_dir=scratch / "medial", seed=args.seed)


def _run(name: str, ee: EarlyExitModel, heads, test_loader) -> dict:
    start = time.perf_counter()
    ee.fit(TOLERANCE, heads=heads)
    fit_s = time.perf_counter() - start
    result = evaluate(ee, test_loader, latency_samples=300)
    active = list(ee.thresholds)
    params = sum(p.numel() for layer in active for p in ee.heads[layer].parameters())
    row = {"variant": name, "fit_seconds": fit_s, "exits": active,
           "active_head_params": params, "active_head_flops": sum(ee.head_flops[layer] for layer in active),
           "all_head_params": sum(p.numel() for h in ee.heads.values() for p in h.parameters()),
           "heads_kept": len(ee.heads), "evaluation": asdict(result),
           "val_agreement_per_head": {h.layer: h.agreement for h in ee.report.heads}}
    print(f"{name:<9} flops {result.flops_fraction:.3f}  agreement {result.agreement:.4f}  "
          f"accuracy {result.accuracy_early_exit:.3f}  latency b1 {result.latency_ratio_b1:.3f} "
          f"b32 {result.latency_ratio_b32:.3f}  active head params {params:,}  exits {active}  (fit {fit_s:.0f} s)",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medial", help="a recorded medial dataset of ResNet-56 on the shared images (same seed)")
    parser.add_argument("--search", type=Path, help="search output folder to keep / reuse (default: temporary)")
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "search_spaces" / "conv_linear.yaml")
    parser.add_argument("--trials", type=int, default=None, help="trials per layer (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; ratios are measured within this run

    model, info = load_backbone("cifar_resnet56")
    traffic = ImageFolderData(default_traffic_dir(), info, seed=args.seed)
    test = torch.utils.data.Subset(traffic, split_indices(len(traffic), args.seed)["test"].tolist())
    test_loader = torch.utils.data.DataLoader(test, batch_size=64, num_workers=2)
    base = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    scratch = Path(tempfile.mkdtemp(prefix="selfxit-nas-ablation-"))
    search_dir = args.search or scratch / "search"
    results: dict = {"tolerance": TOLERANCE, "num_samples": len(traffic), "test_samples": len(test)}
    try:
        medial = _medial(base, args, traffic, scratch)
        config = load_config(args.config)
        searcher = _fresh(base, medial)
        start = time.perf_counter()
        searcher.search(config, search_dir, trials=args.trials)
        wall = time.perf_counter() - start
        searched = load_search(search_dir)
        results["search"] = {"seconds_this_run": wall, "seconds_recorded": searched.seconds,
                             "trials_per_layer": searched.layers[0].trials, "kept": list(searched.heads),
                             "dropped": searched.dropped,
                             "best": {r.layer: r.best for r in searched.layers}}
        print(f"search: {len(searched.layers)} layers x {searched.layers[0].trials} trials, "
              f"{searched.seconds:.0f} s in all (this run {wall:.0f} s); kept {list(searched.heads)}", flush=True)

        rows = [_run("default", _fresh(base, medial), None, test_loader)]
        ee = _fresh(base, medial)
        rows.append(_run("searched", ee, apply_search(ee, search_dir), test_loader))
        fixed = {c.name: config.space.spec(config.space.middle(c.shape), c.shape) for c in base.candidates}
        rows.append(_run("no-NAS", _fresh(base, medial), fixed, test_loader))
        results["variants"] = rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    default, searched_row, no_nas = rows
    print(f"\n{'variant':<10}{'flops':>8}{'agreement':>11}{'accuracy':>10}{'lat b1':>8}{'lat b32':>9}"
          f"{'head params':>13}{'head MFLOPs':>13}  exits")
    for r in rows:
        e = r["evaluation"]
        print(f"{r['variant']:<10}{e['flops_fraction']:>8.3f}{e['agreement']:>11.4f}{e['accuracy_early_exit']:>10.3f}"
              f"{e['latency_ratio_b1']:>8.3f}{e['latency_ratio_b32']:>9.3f}{r['active_head_params']:>13,d}"
              f"{r['active_head_flops'] / 1e6:>13.2f}  {', '.join(r['exits'])}")
    f = {r["variant"]: r["evaluation"]["flops_fraction"] for r in rows}
    saved = lambda a, b: (f[b] - f[a]) / f[b]  # noqa: E731  relative FLOPs reduction of a over b
    print(f"\nsearched vs default: {saved('searched', 'default'):+.1%} FLOPs; searched vs no-NAS: "
          f"{saved('searched', 'no-NAS'):+.1%} FLOPs (positive = searched heads use fewer)")
    target = f["searched"] < f["default"]
    print(f"target searched flops_fraction < default at {TOLERANCE:.0%}: {'PASS' if target else 'MISS'}; "
          f"search time {searched.seconds:.0f} s (target < 1200 s for 20 trials per layer)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
