"""``selfxit demo`` (also what ``selfxit`` with no arguments runs): the embedded default job.

Wrap the shipped CIFAR ResNet-56, enable it on the shared CIFAR-10 images, and print the trade-off on the
held-back test split: one command that shows what the library does without any setup.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from selfxit.cli.common import DEFAULT_MODEL
from selfxit.cli.enable import add_fit_args


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default job on the shipped CIFAR ResNet-56 and CIFAR-10 images")
    p.add_argument("--data", help="default: the shared CIFAR-10 test images")
    p.add_argument("--out", help="bundle folder (default: a temp folder)")
    add_fit_args(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from selfxit.cli.enable import enable
    from selfxit.cli.evaluate import evaluate_bundle, print_table
    args.model, args.weights = DEFAULT_MODEL, None
    out = Path(args.out or Path(tempfile.gettempdir()) / "selfxit-demo-bundle")
    args.out = out
    start = time.perf_counter()
    enable(args)
    print(f"\nbundle written to {out} in {time.perf_counter() - start:.0f} s")
    args.bundle, args.split = out, "test"
    ee, result = evaluate_bundle(args)
    print("\nHeld-back test split (never used for training or thresholds):")
    print_table(ee, result)
