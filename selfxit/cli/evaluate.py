"""``selfxit evaluate``: measure a bundle on a folder of images.

``load_for_evaluation``, ``evaluate_bundle`` and ``print_table`` are also what ``selfxit report`` and
``selfxit demo`` use, so all three commands load the same sample and split the same way.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

from selfxit.cli.common import add_model_args, load_backbone


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="measure a bundle on a folder of images")
    p.add_argument("--bundle", required=True)
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["test", "all"], default="test")
    p.add_argument("--max-samples", type=int, help="default: what enable used (from the bundle)")
    p.add_argument("--seed", type=int, help="default: what enable used (from the bundle)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_runtime_args(p)
    p.set_defaults(func=run)


def add_runtime_args(p) -> None:
    """--engine / --compile / --max-batch: which runtime the early-exit model (and its baseline) runs on."""
    p.add_argument("--engine", choices=["hooks", "buckets"], default="hooks",
                   help="hooks: the exact default runtime; buckets: stages at a ladder of batch sizes")
    p.add_argument("--compile", choices=["off", "heads", "all", "reduce-overhead", "cudagraph"], default="off",
                   help="with --engine buckets: what torch.compile (or CUDA graphs) covers")
    p.add_argument("--max-batch", type=int, default=64, help="with --engine buckets: the largest bucket")


def apply_runtime_args(ee, args) -> None:
    """Set the runtime --engine / --compile / --max-batch ask for (refused, naming the flag, when invalid)."""
    from selfxit.core.bucketed import RuntimeConfig
    if getattr(args, "engine", "hooks") == "hooks" and getattr(args, "compile", "off") == "off":
        return
    try:
        ee.runtime = RuntimeConfig(engine=args.engine, compile=args.compile, max_batch=args.max_batch)
    except ValueError as exc:
        raise SystemExit(f"selfxit evaluate: --engine/--compile/--max-batch: {exc}") from None


def run(args) -> None:
    ee, result = evaluate_bundle(args)
    if args.json:
        print(json.dumps(evaluation_json(result)))
    else:
        print_table(ee, result)


def split_subset(dataset, split: str, seed: int):
    """The 'test' (held-back 30%) or 'all' rows of ``dataset``, split the way ``enable`` split them."""
    import torch

    from selfxit.zoo.data import split_indices
    if split == "all":
        return dataset
    return torch.utils.data.Subset(dataset, split_indices(len(dataset), seed)[split].tolist())


def load_for_evaluation(args):
    """(bundle on its backbone, traffic dataset, seed, max_samples): the same sample and split ``enable`` used,
    unless --seed / --max-samples override what the bundle recorded."""
    import selfxit
    from selfxit.cli.common import traffic_data
    model, info = load_backbone(args)
    ee = selfxit.load(args.bundle, model)
    made = ee.provenance
    seed = args.seed if args.seed is not None else (made.seed or 0)
    max_samples = args.max_samples if args.max_samples is not None else made.max_samples
    dataset = traffic_data(args, info, max_samples, seed)
    if args.split == "test" and made.num_samples not in (None, len(dataset)):
        print(f"warning: the bundle was fit on {made.num_samples} samples, this folder gives {len(dataset)}: "
              "the test split is not the held-back part of the data enable used", file=sys.stderr)
    return ee, dataset, seed, max_samples


def evaluate_bundle(args):
    """(EarlyExitModel, Evaluation) of --bundle on the --split of --data."""
    from selfxit.cli.enable import loader
    from selfxit.evaluate.evaluation import evaluate
    ee, dataset, seed, _ = load_for_evaluation(args)
    apply_runtime_args(ee, args)
    return ee, evaluate(ee, loader(split_subset(dataset, args.split, seed), 64))


def evaluation_json(result) -> dict:
    out = asdict(result)
    out["exit_rates"] = result.exit_rates
    return out


def _number(v) -> str:
    """A table cell: '-' for a rate that could not be measured (None, or NaN for an exit nobody took)."""
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def print_table(ee, result, file=None) -> None:
    """A readable per-exit table plus the overall numbers (to ``file``, default stdout)."""
    file = file or sys.stdout
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    print(f"\n{'exit':<12}{'FLOPs used':>11}{'hit rate':>10}{'agreement':>11}{'accuracy':>10}", file=file)
    for name in result.exit_rates:
        used = 1.0 if name == "final" else 1 - remaining[name] / ee.backbone_flops
        print(f"{name:<12}{used:>11.2f}{result.exit_rates[name]:>10.3f}{_number(result.exit_agreement[name]):>11}"
              f"{_number(result.exit_accuracy[name]):>10}", file=file)
    print(f"\nsamples {result.num_samples}   tolerance {ee.tolerance}   FLOPs fraction {result.flops_fraction:.3f}   "
          f"agreement {result.agreement:.4f}", file=file)
    if result.accuracy_backbone is not None:
        print(f"accuracy: backbone {result.accuracy_backbone:.4f}   early-exit {result.accuracy_early_exit:.4f}", file=file)
    if result.latency_ratio_b1 is not None:
        print(f"latency ratio (early-exit / backbone, CPU): batch 1 {result.latency_ratio_b1:.3f}   "
              f"batch 32 {result.latency_ratio_b32:.3f}   (backbone {result.backbone_ms_b1:.1f} ms at batch 1)", file=file)
    if result.latency_ratio_nofire_b1 is not None:
        print(f"no exit fires (worst case):                  batch 1 {result.latency_ratio_nofire_b1:.3f}   "
              f"batch 32 {_number(result.latency_ratio_nofire_b32)}", file=file)
