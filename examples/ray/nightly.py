"""The nightly job as a Ray job, in place of cron: ``ray job submit --no-wait -- python examples/ray/nightly.py ...``.

Runs on the cluster's head as the job's driver: every day at ``--at`` (UTC) ``selfxit retrain --ray`` on the last
``--since`` of the log (an actor pool records the medial dataset, one Ray task per head; the same publish rule
as the single-process job), then log retention; every hour in between ``selfxit retrain --if-alarmed`` (retrains
early only when the live guard of ``selfxit serve --guard`` says alarmed). ``--once`` runs the nightly retrain
now and exits (for testing the job). The replicas of ``selfxit serve --ray`` follow ``BUNDLES/current`` by
themselves: a publish reaches every replica without restarting them.

Logs go to the job's log (``ray job logs``); stop it with ``ray job stop``. Not run on a real cluster here
(README, "On Ray").
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time


def selfxit(*args: str) -> int:
    """One selfxit command in a child process (a failed night is logged, and the job goes on)."""
    command = [sys.executable, "-m", "selfxit", *args]
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: {' '.join(command)}", flush=True)  # noqa: UP017
    return subprocess.run(command).returncode


def next_at(hour: int, minute: int, now: dt.datetime) -> dt.datetime:
    """The next ``hour:minute`` UTC after ``now``."""
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", required=True, help="traffic log (shared folder or fsspec URL)")
    p.add_argument("--out", required=True, help="BUNDLES: the bundle store the replicas follow")
    p.add_argument("--model", required=True)
    p.add_argument("--weights")
    p.add_argument("--at", default="03:15", help="daily run time, HH:MM UTC")
    p.add_argument("--since", default="24h")
    p.add_argument("--keep-log", default="14d")
    p.add_argument("--replicas", type=int, default=4, help="recording actors")
    p.add_argument("--work-dir", help="retrain's working folder: on the shared filesystem every node mounts")
    p.add_argument("--once", action="store_true", help="run the nightly retrain now, once, and exit")
    args = p.parse_args()
    common = ["--log", args.log, "--out", args.out, "--model", args.model, "--since", args.since, "--ray",
              "--address", "auto", "--replicas", str(args.replicas)]
    common += ["--weights", args.weights] if args.weights else []
    common += ["--work-dir", args.work_dir] if args.work_dir else []
    nightly = ["retrain", *common, "--keep-log", args.keep_log]
    if args.once:
        sys.exit(selfxit(*nightly))
    hour, minute = (int(v) for v in args.at.split(":"))
    while True:
        due = next_at(hour, minute, dt.datetime.now(dt.timezone.utc))  # noqa: UP017
        while (left := (due - dt.datetime.now(dt.timezone.utc)).total_seconds()) > 0:  # noqa: UP017
            time.sleep(min(left, 3600))
            if left > 3600:
                selfxit("retrain", "--if-alarmed", *common)
        selfxit(*nightly)


if __name__ == "__main__":
    main()
