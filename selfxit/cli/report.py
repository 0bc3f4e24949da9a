"""``selfxit report``: write the HTML evaluation report of a bundle (figures + report.json)."""
from __future__ import annotations

import os
from pathlib import Path

from selfxit.cli.common import add_model_args
from selfxit.extras import require_extra


def add_parser(sub) -> None:
    """Register the ``report`` subcommand on an argparse ``sub`` (subparsers) object."""
    p = sub.add_parser("report", help="write an HTML evaluation report of a bundle (figures + report.json)")
    p.add_argument("--bundle", required=True)
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (class subfolders give accuracy too)")
    p.add_argument("--out", required=True, help="report folder to write (index.html, PNGs, report.json)")
    p.add_argument("--split", choices=["test", "all"], default="test")
    p.add_argument("--latency-samples", type=int, default=256, help="samples timed per batch size (at least a batch)")
    p.add_argument("--max-samples", type=int, help="default: what enable used (from the bundle)")
    p.add_argument("--seed", type=int, help="default: what enable used (from the bundle)")
    p.set_defaults(func=run)




def run(args) -> None:
    """Load the bundle and the data split the way ``selfxit evaluate`` does, build the report, say where it went."""
    require_extra("report", "selfxit report")
    from selfxit.cli.evaluate import load_for_evaluation
    from selfxit.evaluate import report
    from selfxit.zoo.data import split_indices

    if args.latency_samples < 1:
        raise ValueError(f"--latency-samples must be >= 1; got {args.latency_samples}")
    ee, dataset, seed, max_samples = load_for_evaluation(args)
    rows = split_indices(len(dataset), seed)["test"] if args.split == "test" else None
    details = {"bundle": str(args.bundle), "model": args.model, "weights": str(args.weights) if args.weights else None,
               "data": str(dataset.root), "split": args.split, "seed": seed, "max_samples": max_samples}
    report.build_report(ee, dataset, rows, args.out, latency_samples=args.latency_samples,
                        batch_sizes=report.BATCH_SIZES, bundle_dir=args.bundle, weights_path=args.weights,
                        info=details, num_workers=min(2, os.cpu_count() or 1))
    print(f"report written to {Path(args.out) / 'index.html'} (numbers in {Path(args.out) / 'report.json'})")
