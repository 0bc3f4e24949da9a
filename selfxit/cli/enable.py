"""``selfxit enable``: collect + fit on a folder of images and write a bundle.

The fit settings come from three places, in this order of precedence: a flag given on the command line,
then ``--config fit.yaml`` (a :class:`selfxit.fit.config.FitConfig`), then FitConfig's own defaults. So the
flags that a config file can also set (--tolerance, --delta, --max-exits, --gate) default to None here:
None means "not given", and only a given flag overrides the file.

Only argparse-level imports at module level: ``selfxit --help`` must not pay for torch.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from selfxit.cli.common import add_model_args, augment_value, load_backbone, loader, traffic_data

# command-line flag (argparse dest) -> FitConfig field, for the flags a config file can also set
CONFIG_FLAGS = {"tolerance": "tolerance", "delta": "delta", "max_exits": "max_exits", "gate": "gate"}
GATES = ("confidence", "learned")  # mirrors selfxit.fit.gates.GATES, which imports torch


def add_fit_args(p) -> None:
    """The collect + fit flags ``enable`` and ``demo`` share."""
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed agreement drop, e.g. 0.01 (default: --config's, else 0.01)")
    p.add_argument("--max-samples", type=int, help="use a seeded random subset of the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=None,
                   help="1 - confidence level of the tolerance promise (default: --config's, else 0.1)")
    p.add_argument("--max-exits", type=int, default=None,
                   help="most active exits in the cascade (default: --config's, else 4)")
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--augment", type=augment_value, default=2,
                   help="label-free copies of train traffic for distillation: a number of flip/shift copies, "
                        "or a YAML mapping, e.g. '{copies: 2, mixup: 1, cutmix: 1, jitter: 0.2}'")
    p.add_argument("--medial-dir", help="keep the medial dataset here (default: temporary, deleted)")


def add_parser(sub) -> None:
    p = sub.add_parser("enable", help="collect + fit on a folder of images and write a bundle")
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat); labels are ignored")
    p.add_argument("--out", required=True, help="bundle folder to write")
    add_fit_args(p)
    p.add_argument("--config", type=Path, help="fit settings file (YAML or JSON, a FitConfig); flags given "
                                               "on the command line override its values")
    p.add_argument("--search", help="use the heads of a finished `selfxit search` output folder")
    p.add_argument("--gate", choices=GATES, default=None,
                   help="exit rule: a threshold on the calibrated max-softmax, or on learned gates "
                        "(default: --config's, else confidence)")
    p.set_defaults(func=run)


def fit_config_from_args(args):
    """The FitConfig to fit with: ``--config`` (or the defaults), then every flag given explicitly on top."""
    from selfxit.fit.config import FitConfig
    path = getattr(args, "config", None)
    config = FitConfig.from_file(path) if path else FitConfig()
    given = {field: getattr(args, dest) for dest, field in CONFIG_FLAGS.items() if getattr(args, dest, None) is not None}
    return config.replace(**given) if given else config


def enable(args):
    """collect + fit on the images in --data, write the bundle to --out; returns the EarlyExitModel."""
    import torch

    import selfxit
    from selfxit.core.provenance import Provenance
    if args.tolerance is not None and not 0 < args.tolerance < 1:
        raise SystemExit(f"error: --tolerance must be in (0, 1), e.g. 0.01; got {args.tolerance}")
    config = fit_config_from_args(args)  # a bad --config fails before the (slow) model load and collect
    from selfxit.fit.augment import AugmentConfig, AugmentConfigError
    try:
        augmentation = AugmentConfig.coerce(args.augment)  # like --config: before the model load and collect
    except AugmentConfigError as exc:
        raise AugmentConfigError(f"--augment: {exc}") from None
    model, info = load_backbone(args)
    dataset = traffic_data(args, info, args.max_samples, args.seed)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size), max_candidates=args.max_candidates)
    heads = None
    if getattr(args, "search", None):  # searched heads; layers the search dropped are not recorded
        from selfxit.search.run import apply_search
        heads = apply_search(ee, args.search)
    medial_dir = Path(args.medial_dir) if args.medial_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
    try:
        ee.collect(loader(dataset), out_dir=medial_dir, seed=args.seed, augment_copies=augmentation)
        ee.fit(config=config if heads is None else config.replace(heads=heads))
    finally:
        if not args.medial_dir:
            shutil.rmtree(medial_dir, ignore_errors=True)
    ee.provenance = Provenance(model=args.model, weights=str(args.weights) if args.weights else None,
                               data=str(dataset.root), seed=args.seed, max_samples=args.max_samples,
                               num_samples=len(dataset),
                               search=str(args.search) if getattr(args, "search", None) else None,
                               gate=config.gate)
    ee.save(args.out)
    return ee


def run(args) -> None:
    enable(args)
