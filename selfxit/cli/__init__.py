"""The ``selfxit`` command line: enable, evaluate, candidates, and the embedded default job (``selfxit demo``)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

DEFAULT_MODEL = "cifar_resnet56"


def _quiet_libraries() -> None:
    os.environ.setdefault("NNI_FRAMEWORK", "none")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", module="deepspeed")
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _backbone(args):
    from selfxit.zoo import load_backbone
    return load_backbone(args.model, args.weights)


def _traffic(args, info, max_samples=None, seed=0):
    from selfxit.zoo.data import ImageFolderData, default_traffic_dir
    root = Path(args.data) if args.data else default_traffic_dir()
    return ImageFolderData(root, info, max_samples=max_samples, seed=seed)


def _loader(dataset, batch_size=256):
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=min(2, os.cpu_count() or 1))


def enable(args) -> "EarlyExitModel":  # noqa: F821
    """collect + fit on the images in --data, write the bundle to --out."""
    import torch
    import selfxit
    from selfxit.core.provenance import Provenance
    if not 0 < args.tolerance < 1:
        raise SystemExit(f"error: --tolerance must be in (0, 1), e.g. 0.01; got {args.tolerance}")
    model, info = _backbone(args)
    dataset = _traffic(args, info, args.max_samples, args.seed)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size), max_candidates=args.max_candidates)
    heads = None
    if getattr(args, "search", None):  # searched heads; layers the search dropped are not recorded
        from selfxit.search.run import apply_search
        heads = apply_search(ee, args.search)
    medial_dir = Path(args.medial_dir) if args.medial_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
    try:
        ee.collect(_loader(dataset), out_dir=medial_dir, seed=args.seed, augment_copies=args.augment)
        ee.fit(args.tolerance, heads=heads, delta=args.delta, max_exits=args.max_exits,
               gate=getattr(args, "gate", "confidence"))
    finally:
        if not args.medial_dir:
            shutil.rmtree(medial_dir, ignore_errors=True)
    ee.provenance = Provenance(model=args.model, weights=str(args.weights) if args.weights else None,
                               data=str(dataset.root), seed=args.seed, max_samples=args.max_samples,
                               num_samples=len(dataset),
                               search=str(args.search) if getattr(args, "search", None) else None,
                               gate=getattr(args, "gate", "confidence"))
    ee.save(args.out)
    return ee


def search(args) -> None:
    """collect the medial dataset on --data, then search a head per candidate layer into --out (resumable)."""
    import torch
    import selfxit
    from selfxit.search.space import load_config
    config = load_config(args.config)  # a bad config fails before anything is recorded
    if args.trials is not None and args.trials < 1:
        raise SystemExit(f"error: --trials must be a positive integer; got {args.trials}")
    model, info = _backbone(args)
    dataset = _traffic(args, info, args.max_samples, args.seed)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size), max_candidates=args.max_candidates)
    for cand in ee.candidates:
        config.space.check_fits(cand.name, cand.shape)
    medial_dir = Path(args.medial_dir) if args.medial_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
    try:
        ee.collect(_loader(dataset), out_dir=medial_dir, seed=args.seed, augment_copies=args.augment)
        result = ee.search(config, args.out, trials=args.trials)
    except KeyboardInterrupt:
        raise SystemExit(f"\nsearch interrupted; run the same command again to resume from {args.out}")
    finally:
        if not args.medial_dir:
            shutil.rmtree(medial_dir, ignore_errors=True)
    print(f"\n{'layer':<12}{'kept':>6}{'agreement':>11}{'head MFLOPs':>13}{'score':>8}  best head")
    for r in result.layers:
        b = r.best or {}
        agree = f"{b['agreement']:.3f}" if b else "-"
        print(f"{r.layer:<12}{'yes' if r.kept else 'no':>6}{agree:>11}{(b.get('head_flops') or 0) / 1e6:>13.2f}"
              f"{b.get('score') or 0:>8.3f}  {b.get('spec') if r.kept else r.reason}")
    print(f"\nsearched heads in {Path(args.out) / 'best_heads.json'}; use them with "
          f"`selfxit enable ... --search {args.out}`")


def _split_subset(dataset, split: str, seed: int):
    import torch
    from selfxit.zoo.data import split_indices
    if split == "all":
        return dataset
    return torch.utils.data.Subset(dataset, split_indices(len(dataset), seed)[split].tolist())


def load_for_evaluation(args):
    """(bundle on its backbone, traffic dataset, seed, max_samples): the same sample and split ``enable`` used,
    unless --seed / --max-samples override what the bundle recorded."""
    import selfxit
    model, info = _backbone(args)
    ee = selfxit.load(args.bundle, model)
    made = ee.provenance
    seed = args.seed if args.seed is not None else (made.seed or 0)
    max_samples = args.max_samples if args.max_samples is not None else made.max_samples
    dataset = _traffic(args, info, max_samples, seed)
    if args.split == "test" and made.num_samples not in (None, len(dataset)):
        print(f"warning: the bundle was fit on {made.num_samples} samples, this folder gives {len(dataset)}: "
              "the test split is not the held-back part of the data enable used", file=sys.stderr)
    return ee, dataset, seed, max_samples


def evaluate_bundle(args):
    from selfxit.evaluate.evaluation import evaluate
    ee, dataset, seed, _ = load_for_evaluation(args)
    return ee, evaluate(ee, _loader(_split_subset(dataset, args.split, seed), 64))


def _evaluation_json(result) -> dict:
    out = asdict(result)
    out["exit_rates"] = result.exit_rates
    return out


def print_table(ee, result, file=sys.stdout) -> None:
    """A readable per-exit table plus the overall numbers."""
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    print(f"\n{'exit':<12}{'FLOPs used':>11}{'hit rate':>10}{'agreement':>11}{'accuracy':>10}", file=file)
    for name in result.exit_rates:
        used = 1.0 if name == "final" else 1 - remaining[name] / ee.backbone_flops
        acc = result.exit_accuracy[name]
        fmt = lambda v: "-" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        print(f"{name:<12}{used:>11.2f}{result.exit_rates[name]:>10.3f}{fmt(result.exit_agreement[name]):>11}"
              f"{fmt(acc):>10}", file=file)
    print(f"\nsamples {result.num_samples}   tolerance {ee.tolerance}   FLOPs fraction {result.flops_fraction:.3f}   "
          f"agreement {result.agreement:.4f}", file=file)
    if result.accuracy_backbone is not None:
        print(f"accuracy: backbone {result.accuracy_backbone:.4f}   early-exit {result.accuracy_early_exit:.4f}", file=file)
    if result.latency_ratio_b1 is not None:
        print(f"latency ratio (early-exit / backbone, CPU): batch 1 {result.latency_ratio_b1:.3f}   "
              f"batch 32 {result.latency_ratio_b32:.3f}   (backbone {result.backbone_ms_b1:.1f} ms at batch 1)", file=file)


def demo(args) -> None:
    """The embedded default job: wrap the shipped CIFAR ResNet-56, use the shared CIFAR-10 images, print the trade-off."""
    args.model, args.weights = DEFAULT_MODEL, None
    out = Path(args.out or Path(tempfile.gettempdir()) / "selfxit-demo-bundle")
    args.out = out
    start = time.perf_counter()
    ee = enable(args)
    print(f"\nbundle written to {out} in {time.perf_counter() - start:.0f} s")
    args.bundle, args.split = out, "test"
    ee, result = evaluate_bundle(args)
    print("\nHeld-back test split (never used for training or thresholds):")
    print_table(ee, result)


def candidates(args) -> None:
    import torch
    from selfxit.core.candidates import find_candidates
    model, info = _backbone(args)
    size = tuple(int(v) for v in args.input_size.split(",")) if args.input_size else info.input_size
    found = find_candidates(model, torch.zeros(1, *size), max_candidates=args.max_candidates)
    if args.json:
        print(json.dumps([c.to_dict() for c in found], indent=1))
    else:
        for c in found:
            print(f"{c.name:<30}{str(list(c.shape)):<20}{c.remaining_flops:>14,d}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfxit", description="Label-free early exits for a frozen classifier.")
    sub = parser.add_subparsers(dest="command")

    def model_args(p, required=True):
        p.add_argument("--model", required=required, default=DEFAULT_MODEL,
                       help="cifar_resnet20/32/44/56/110 or a torchvision classifier name")
        p.add_argument("--weights", type=Path, help="checkpoint file (state dict) for the model")

    def fit_args(p):
        p.add_argument("--tolerance", type=float, default=0.01, help="allowed agreement drop, e.g. 0.01")
        p.add_argument("--max-samples", type=int, help="use a seeded random subset of the images")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--delta", type=float, default=0.1, help="1 - confidence level of the tolerance promise")
        p.add_argument("--max-exits", type=int, default=3, help="most active exits in the cascade")
        p.add_argument("--max-candidates", type=int, default=10)
        p.add_argument("--augment", type=int, default=2, help="augmented copies of train traffic for distillation")
        p.add_argument("--medial-dir", help="keep the medial dataset here (default: temporary, deleted)")

    p = sub.add_parser("enable", help="collect + fit on a folder of images and write a bundle")
    model_args(p)
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat); labels are ignored")
    p.add_argument("--out", required=True, help="bundle folder to write")
    fit_args(p)
    p.add_argument("--search", help="use the heads of a finished `selfxit search` output folder")
    p.add_argument("--gate", choices=["confidence", "learned"], default="confidence",
                   help="exit rule: a threshold on the calibrated max-softmax, or on learned gates")
    p.set_defaults(func=lambda a: enable(a) and None)

    p = sub.add_parser("search", help="NAS of exit heads with NNI, from a search-space config (resumable)")
    model_args(p)
    p.add_argument("--config", required=True, help="search config, e.g. search_spaces/conv_linear.yaml")
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat); labels are ignored")
    p.add_argument("--out", required=True, help="search output folder (an interrupted search resumes from it)")
    p.add_argument("--trials", type=int, help="trials per candidate layer (overrides the config)")
    p.add_argument("--max-samples", type=int, help="use a seeded random subset of the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--augment", type=int, default=2, help="augmented copies of train traffic for distillation")
    p.add_argument("--medial-dir", help="keep the medial dataset here (default: temporary, deleted)")
    p.set_defaults(func=search)

    p = sub.add_parser("evaluate", help="measure a bundle on a folder of images")
    p.add_argument("--bundle", required=True)
    model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["test", "all"], default="test")
    p.add_argument("--max-samples", type=int, help="default: what enable used (from the bundle)")
    p.add_argument("--seed", type=int, help="default: what enable used (from the bundle)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run_evaluate(a):
        ee, result = evaluate_bundle(a)
        print(json.dumps(_evaluation_json(result))) if a.json else print_table(ee, result)

    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("candidates", help="list the candidate exit layers found in a model")
    model_args(p)
    p.add_argument("--input-size", help="C,H,W (default: the model's)")
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=candidates)

    p = sub.add_parser("demo", help="the embedded default job on the shipped CIFAR ResNet-56 and CIFAR-10 images")
    p.add_argument("--data", help="default: the shared CIFAR-10 test images")
    p.add_argument("--out", help="bundle folder (default: a temp folder)")
    fit_args(p)
    p.set_defaults(func=demo)

    from selfxit.cli.report import add_report_parser
    from selfxit.serve.app import add_serve_parser
    add_report_parser(sub)
    add_serve_parser(sub)
    from selfxit.cli.collect import add_collect_parser
    add_collect_parser(sub)
    from selfxit.cli.retrain import add_retrain_parsers
    add_retrain_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no arguments: the embedded default job
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"selfxit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
