"""``selfxit retrain``, ``selfxit rollback`` and ``selfxit versions``: the nightly job and its published versions.

Nothing heavy is imported at module level (``selfxit --help`` must not import torch): the run functions
import what they need.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from selfxit.cli.common import add_model_args, load_backbone


def run_retrain(args) -> None:
    """Run the nightly job once: retrain on the window, publish only if the candidate passes validation,
    then apply log retention (after the window has been read)."""
    from selfxit.ops.retrain import RetrainConfig, parse_duration, retrain, summary
    from selfxit.ops.signals import Interrupted
    from selfxit.ops.versions import BundleStore
    config = RetrainConfig(since=parse_duration(args.since) if args.since != "all" else None,
                           holdout_fraction=args.holdout, tolerance=args.tolerance, min_records=args.min_records,
                           seed=args.seed, epochs=args.epochs, keep=args.keep, work_dir=args.work_dir,
                           ray_workers=args.replicas if args.ray else 0)
    if args.ray:  # record on an actor pool, heads as Ray tasks (selfxit.ops.ray_jobs); the same publish rule
        from selfxit.ops.ray_cluster import connect, shutdown_at_exit
        if connect(args.address, args.ray_cpus, feature="selfxit retrain --ray"):
            shutdown_at_exit()
    if not Path(args.log).exists() and "://" not in str(args.log):
        raise FileNotFoundError(f"traffic log not found: {args.log} (write one with `selfxit serve --log` or `selfxit collect`)")
    from selfxit.ops.retrain import guard_alarm, read_guard_state
    state_path = args.guard_state or (None if "://" in str(args.log) else Path(args.log) / "guard.json")
    if args.if_alarmed:  # the hourly job: only when the live guard found the promise broken
        if state_path is None:
            raise ValueError("--if-alarmed with a remote --log needs --guard-state (the server's guard.json)")
        run_now, why = guard_alarm(state_path, args.log, args.min_records)
        if not run_now:
            print(json.dumps({"published": False, "ran": False, "reason": why}, indent=1) if args.json
                  else f"selfxit retrain --if-alarmed: {why}")
            return
        print(f"selfxit retrain --if-alarmed: {why}: retraining", file=sys.stderr)
    guard = None  # the live guard's state, when the server runs --guard: kept in the result, its scale checked
    if state_path is not None:
        try:
            guard = read_guard_state(state_path)
        except FileNotFoundError:
            if args.guard_state:
                raise
        except ValueError as exc:
            print(f"selfxit retrain: {exc}; going on without it", file=sys.stderr)
    model, info = load_backbone(args)
    store = BundleStore(args.out, keep=args.keep)
    try:
        result = retrain(args.log, store, model, info, config, current_bundle=args.bundle, progress=not args.json,
                         guard=guard)
    except Interrupted as e:  # SIGTERM / SIGINT: the working folder is already removed
        print(f"selfxit retrain: {e}; its working folder was removed; current version: {store.current()}",
              file=sys.stderr)
        raise
    out = result.to_dict()
    if args.keep_log or args.max_log_bytes:  # retention, after the window has been used
        from selfxit.ops.traffic import TrafficLog
        out["log_records_pruned"] = TrafficLog(args.log).prune(
            max_age_s=parse_duration(args.keep_log) if args.keep_log else None, max_bytes=args.max_log_bytes)
    print(json.dumps(out, indent=1) if args.json else summary(result))
    if not args.json and "log_records_pruned" in out:
        print(f"log retention: {out['log_records_pruned']} old records removed")
    if not args.json and result.published:
        print(f"serve {store.current_path} to pick it up (the server reloads it by itself)")


def run_rollback(args) -> None:
    """Make the previous published version current again (the server reloads it by itself)."""
    from selfxit.ops.versions import BundleStore
    store = BundleStore(args.out)
    before = store.current()
    now = store.rollback(reason=args.reason)
    print(f"rolled back {store.root}: current is now {now} (was {before})")


def run_versions(args) -> None:
    """List published versions (current marked) and the last publish/rollback events with their reasons."""
    from selfxit.ops.versions import BundleStore
    store = BundleStore(args.out)
    versions = store.versions()
    if args.json:
        print(json.dumps({"current": store.current(), "versions": [v.name for v in versions],
                          "history": store.history()}, indent=1))
        return
    if not versions:
        print(f"{store.root}: no published versions")
        return
    for v in versions:
        print(f"{'*' if v.current else ' '} {v.name}  created {v.created or '?'}")
    for event in store.history()[-5:]:
        print(f"  {event.get('time')} {event.get('event')} {event.get('version')}: {event.get('reason', '')}",
              file=sys.stdout)


def add_ray_args(p, replicas_help: str) -> None:
    """``--ray``, ``--address``, ``--replicas`` and ``--ray-cpus`` of ``retrain`` and ``collect``."""
    g = p.add_argument_group("Ray (--ray; needs pip install 'selfxit[ray]')")
    g.add_argument("--ray", action="store_true", help="run the heavy steps on Ray (Ray Data, an actor pool)")
    g.add_argument("--address", help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto); default: start a "
                                     "local one on 127.0.0.1")
    g.add_argument("--replicas", type=int, default=2, help=replicas_help + " (default 2)")
    g.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray started without --address (default: all)")


def add_parser(sub) -> None:
    """Register ``retrain``, ``rollback`` and ``versions`` on an argparse ``sub`` (subparsers) object."""
    p = sub.add_parser("retrain", help="retrain exits on logged traffic; publish only if they pass validation")
    p.add_argument("--log", required=True, help="traffic log folder or fsspec URL")
    p.add_argument("--bundle", help="the bundle serving now (default: BUNDLES/current)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="BUNDLES: folder of published versions (serve BUNDLES/current)")
    p.add_argument("--since", default="24h", help="window: 90s, 30m, 24h, 7d ... or 'all' (default 24h)")
    p.add_argument("--tolerance", type=float, help="default: the current bundle's")
    p.add_argument("--holdout", type=float, default=0.3, help="newest share of the window kept for validation")
    p.add_argument("--min-records", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10, help="distillation epochs (heads are warm-started)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=5, help="published versions kept")
    p.add_argument("--work-dir", help="parent of the run's working folder (the medial dataset; tens of GB at "
                                      "224x224); default BUNDLES/.work. Removed when the run ends")
    p.add_argument("--keep-log", help="after the job, delete log shards older than this (e.g. 7d)")
    p.add_argument("--max-log-bytes", type=int, help="after the job, delete the oldest log shards beyond this size")
    p.add_argument("--if-alarmed", action="store_true",
                   help="run only when the live guard's state (`selfxit serve --guard`) says alarmed and the log "
                        "holds --min-records records since the alarm; otherwise exit 0 saying why")
    p.add_argument("--guard-state", help="the live guard's state file (default: LOG/guard.json when it exists); "
                                         "read by every run: kept in the result, and when alarmed the current "
                                         "bundle is also checked at the guard's last scale")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_ray_args(p, "backbone actors recording the medial dataset (heads train as one Ray task per layer)")
    p.set_defaults(func=run_retrain)

    p = sub.add_parser("rollback", help="make the previous published version current again")
    p.add_argument("--out", "--bundles", dest="out", required=True, help="BUNDLES folder")
    p.add_argument("--reason", default="manual rollback")
    p.set_defaults(func=run_rollback)

    p = sub.add_parser("versions", help="list published versions and their history")
    p.add_argument("--out", "--bundles", dest="out", required=True, help="BUNDLES folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_versions)


