"""``selfxit search``: NAS of exit heads with NNI, from a search-space config (resumable).

Only argparse-level imports at module level: NNI and torch load when the command runs, not for ``--help``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from selfxit.cli.common import add_model_args, augment_value, load_backbone
from selfxit.extras import require_extra


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="NAS of exit heads with NNI, from a search-space config (resumable)")
    add_model_args(p)
    p.add_argument("--config", required=True, help="search config, e.g. search_spaces/conv_linear.yaml")
    p.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat); labels are ignored")
    p.add_argument("--out", required=True, help="search output folder (an interrupted search resumes from it)")
    p.add_argument("--trials", type=int, help="trials per candidate layer (overrides the config)")
    p.add_argument("--max-samples", type=int, help="use a seeded random subset of the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--augment", type=augment_value, default=2,
                   help="label-free copies of train traffic for distillation: a number of flip/shift copies, "
                        "or a YAML mapping, e.g. '{copies: 2, mixup: 1, cutmix: 1, jitter: 0.2}'")
    p.add_argument("--medial-dir", help="keep the medial dataset here (default: temporary, deleted)")
    p.set_defaults(func=run)


def run(args) -> None:
    """collect the medial dataset on --data, then search a head per candidate layer into --out (resumable)."""
    require_extra("search", "selfxit search")
    import torch

    import selfxit
    from selfxit.cli.common import loader, traffic_data
    from selfxit.search.config import load_config
    config = load_config(args.config)  # a bad config fails before anything is recorded
    if args.trials is not None and args.trials < 1:
        raise SystemExit(f"error: --trials must be a positive integer; got {args.trials}")
    model, info = load_backbone(args)
    dataset = traffic_data(args, info, args.max_samples, args.seed)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size), max_candidates=args.max_candidates)
    for cand in ee.candidates:
        config.space.check_fits(cand.name, cand.shape)
    medial_dir = Path(args.medial_dir) if args.medial_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
    try:
        ee.collect(loader(dataset), out_dir=medial_dir, seed=args.seed, augment_copies=args.augment)
        result = ee.search(config, args.out, trials=args.trials)
    except KeyboardInterrupt:
        raise SystemExit(f"\nsearch interrupted; run the same command again to resume from {args.out}") from None
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
