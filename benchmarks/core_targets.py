"""Core targets on the shared ResNet-56 and CIFAR-10 images, measured on the held-back test split.

    .venv/bin/python benchmarks/core_targets.py [--max-samples N] [--json out.json]

Prints, for tolerance 1% and 5%: flops_fraction, agreement, accuracy, latency ratios (early-exit /
backbone wall time on this CPU, measured in the same run), the worst case (thresholds that never
fire), the paper's and the uncorrected joint optimizer's numbers for comparison, and the wall time of
the whole enable run (collect + fit).
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
from selfxit.cli.evaluate import print_table  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, default_traffic_dir, split_indices  # noqa: E402

TARGETS = {0.01: (0.990, 0.85), 0.05: (0.950, 0.72)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model, info = load_backbone("cifar_resnet56")
    traffic = ImageFolderData(default_traffic_dir(), info, max_samples=args.max_samples, seed=args.seed)
    loader = torch.utils.data.DataLoader(traffic, batch_size=256, num_workers=2)
    test = torch.utils.data.Subset(traffic, split_indices(len(traffic), args.seed)["test"].tolist())
    test_loader = torch.utils.data.DataLoader(test, batch_size=64, num_workers=2)
    medial_dir = Path(tempfile.mkdtemp(prefix="selfxit-bench-"))
    results = {"num_samples": len(traffic), "runs": {}}
    try:
        start = time.perf_counter()
        ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
        ee.collect(loader, out_dir=medial_dir, seed=args.seed)
        collect_s = time.perf_counter() - start
        for tolerance, (agreement_bar, flops_bar) in TARGETS.items():
            fit_start = time.perf_counter()
            report = ee.fit(tolerance)
            fit_s = time.perf_counter() - fit_start
            result = evaluate(ee, test_loader, latency_samples=300)
            print(f"\n=== tolerance {tolerance:.0%} (fit {fit_s:.0f} s) ===")
            print_table(ee, result)
            never = dict(ee.thresholds)
            ee.thresholds = {name: 2.0 for name in never}  # confidences never reach 2: the worst case
            worst = evaluate(ee, test_loader, latency_samples=300, progress=False)
            ee.thresholds = never
            run = {"evaluation": asdict(result), "fit_seconds": fit_s,
                   "worst_case_latency_ratio_b1": worst.latency_ratio_b1,
                   "worst_case_latency_ratio_b32": worst.latency_ratio_b32,
                   "baselines_test": {m: asdict(s["test"]) for m, s in report.baselines.items() if "test" in s},
                   "heads": [asdict(h) for h in report.heads],
                   "targets": {"agreement>=": agreement_bar, "flops_fraction<=": flops_bar}}
            results["runs"][str(tolerance)] = run
            print(f"worst case (no exit fires): latency ratio b1 {worst.latency_ratio_b1:.3f}  b32 {worst.latency_ratio_b32:.3f}")
            for m, s in report.baselines.items():
                if "test" in s:
                    print(f"  {m:<9} (recorded test predictions) flops {s['test'].flops_fraction:.3f} "
                          f"agreement {s['test'].agreement:.4f} exits {s['test'].exits}")
            ok = result.agreement >= agreement_bar and result.flops_fraction <= flops_bar
            lat = (abs(result.latency_ratio_b1 - result.flops_fraction) <= 0.10 and
                   abs(result.latency_ratio_b32 - result.flops_fraction) <= 0.15)
            print(f"target agreement >= {agreement_bar} and flops <= {flops_bar}: {'PASS' if ok else 'MISS'};"
                  f" latency within 0.10/0.15 of flops: {'PASS' if lat else 'MISS'}")
            if tolerance == 0.01:
                results["enable_seconds_t1"] = collect_s + fit_s
        print(f"\nenable (wrap + collect + fit at 1%) on {len(traffic)} images: {results['enable_seconds_t1']:.0f} s "
              f"(target < 600 s); collect alone {collect_s:.0f} s")
    finally:
        shutil.rmtree(medial_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
