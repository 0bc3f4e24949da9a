"""``selfxit candidates``: list the candidate exit layers found in a model (name, shape, FLOPs left after it,
share of the FLOPs spent before it, bytes each recorded row stores for it in the medial dataset with the default
heads); ``--all`` adds every rejected articulation point with the reason."""
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
    p.add_argument("--budget", type=int, default=None,
                   help="medial bytes per row that stored_bytes is planned against (default: collect's, 512 KiB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from selfxit.core.candidates import candidate_table
    from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET, plan_storage
    model, info = load_backbone(args)
    size = tuple(int(v) for v in args.input_size.split(",")) if args.input_size else info.input_size
    table = candidate_table(model, torch.zeros(1, *size), max_candidates=args.max_candidates)
    entries = table if args.all else [entry for entry in table if entry.kept]
    kept = [entry for entry in table if entry.kept]
    # what collect stores per row with its defaults (full maps when all fit the budget, else the default head's input)
    plan = plan_storage([e.name for e in kept], [e.shape for e in kept], None, args.budget or DEFAULT_ROW_BUDGET)
    stored = {c.name: c.bytes for c in plan.candidates}
    if args.json:
        rows = [entry.to_dict() if args.all else entry.candidate().to_dict() for entry in entries]
        for row in rows:
            row["stored_bytes"] = stored.get(row["name"])  # None for a rejected layer: nothing is recorded for it
        print(json.dumps(rows, indent=1))
        return
    for entry in entries:
        shape = "-" if entry.shape is None else str(list(entry.shape))
        remaining = "-" if entry.remaining_flops is None else f"{entry.remaining_flops:,d}"
        spent = "-" if entry.cumulative_flops_fraction is None else f"{entry.cumulative_flops_fraction:.1%}"
        line = f"{entry.name:<36}{shape:<20}{remaining:>16}{spent:>8}{stored.get(entry.name, '-'):>10}"
        print(line + ("" if entry.kept else f"  rejected: {entry.reason}") if args.all else line)
