"""``selfxit candidates``: list the candidate exit layers found in a model (name, shape, FLOPs left after it)."""
from __future__ import annotations

import json

from selfxit.cli.common import add_model_args, load_backbone


def add_parser(sub) -> None:
    p = sub.add_parser("candidates", help="list the candidate exit layers found in a model")
    add_model_args(p)
    p.add_argument("--input-size", help="C,H,W (default: the model's)")
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from selfxit.core.candidates import find_candidates
    model, info = load_backbone(args)
    size = tuple(int(v) for v in args.input_size.split(",")) if args.input_size else info.input_size
    found = find_candidates(model, torch.zeros(1, *size), max_candidates=args.max_candidates)
    if args.json:
        print(json.dumps([c.to_dict() for c in found], indent=1))
    else:
        for c in found:
            print(f"{c.name:<30}{list(c.shape)!s:<20}{c.remaining_flops:>14,d}")
