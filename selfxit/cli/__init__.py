"""The ``selfxit`` command line: one module per command, this one only builds the parser and dispatches.

Every command module has ``add_parser(sub)``, which registers its subcommand(s) with ``set_defaults(func=run)``,
and imports torch, numpy and the rest of selfxit only inside its run functions. So building the parser is
cheap and ``selfxit --help`` or a mistyped flag answers at once instead of after the ~7 s it takes to import
torch, NNI and DeepSpeed (tests/test_startup.py keeps it that way).
"""
from __future__ import annotations

import argparse
import sys

from selfxit.cli import (
    candidates,
    collect,
    demo,
    enable,
    evaluate,
    report,
    retrain,
    search,
    serve,
)
from selfxit.cli.common import quiet_libraries
from selfxit.extras import MissingExtraError

# in the order `selfxit --help` lists them; retrain also registers rollback and versions
COMMANDS = (enable, search, evaluate, candidates, demo, report, serve, collect, retrain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfxit", description="Label-free early exits for a frozen classifier.")
    sub = parser.add_subparsers(dest="command")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on a bad input the command reported (argparse errors exit 2 too)."""
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no arguments: the embedded default job
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError, MissingExtraError) as exc:
        print(f"selfxit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
