"""``selfxit candidates``: list the candidate exit layers found in a model (name, shape, FLOPs left after it,
share of the FLOPs spent before it); ``--all`` adds every rejected articulation point with the reason."""
from __future__ import annotations

import json

from selfxit.cli.common import add_model_args, load_backbone


def add_parser(sub) -> None:
    p = sub.add_parser("candidates", help="list the candidate exit layers found in a model")
    add_model_args(p)
    p.add_argument("--input-size", help="C,H,W (default: the model's)")
    p.add_argument("--max-candidates", type=int, default=10)
    p.add_argument("--all", action="store_true",
                   help="also list the rejected layers (kept: false) with the reason each was rejected")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from selfxit.core.candidates import candidate_table
    model, info = load_backbone(args)
    size = tuple(int(v) for v in args.input_size.split(",")) if args.input_size else info.input_size
    table = candidate_table(model, torch.zeros(1, *size), max_candidates=args.max_candidates)
    entries = table if args.all else [entry for entry in table if entry.kept]
    if args.json:
        rows = [entry.to_dict() if args.all else entry.candidate().to_dict() for entry in entries]
        print(json.dumps(rows, indent=1))
        return
    for entry in entries:
        shape = "-" if entry.shape is None else str(list(entry.shape))
        remaining = "-" if entry.remaining_flops is None else f"{entry.remaining_flops:,d}"
        spent = "-" if entry.cumulative_flops_fraction is None else f"{entry.cumulative_flops_fraction:.1%}"
        line = f"{entry.name:<36}{shape:<20}{remaining:>16}{spent:>8}"
        print(line + ("" if entry.kept else f"  rejected: {entry.reason}") if args.all else line)
