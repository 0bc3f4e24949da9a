"""Retrain kill probes for benchmarks/reliability.py (and tests/ops/test_ops_reliability.py, at small counts).

Real ``selfxit retrain`` processes on a small CIFAR ResNet-20 setup are killed with SIGKILL at random
moments and at each step of the publish (while the version is copied in, after it is renamed into
``versions/``, after ``current`` moved, after the history line), or sent SIGTERM. After every kill the
published bundle must load; litter left by a dead run must be gone once a later run has done its
start-up cleanup; after a final uninterrupted run nothing may be left: no working folder, no staging
folder or marker, no version that was never made current, nothing in the runs' temp dir.

A child reports its progress on stdout (``stage <name>``) through hooks installed before the CLI runs;
with ``RELIABILITY_PAUSE=<name>`` it blocks at that stage until killed.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from selfxit.core.atomic import TMP_MARK, pid_alive

PUBLISH_STAGES = ("copy", "renamed", "pointed", "logged")
EPOCHS = 5  # enough for the small setup's candidate to pass validation and be published
CHILD = r"""
import os, shutil, sys
from selfxit import api, cli
from selfxit.ops import retrain as R, versions as V
pause_at, copied = os.environ.get("RELIABILITY_PAUSE", ""), []
def stage(name):
    print("stage", name, flush=True)
    if name == pause_at:
        sys.stdin.readline()  # the parent kills us here
real_clean, real_fit, real_copy = R._remove_litter, api.EarlyExitModel.fit, shutil.copy2
real_point, real_log = V.BundleStore._point_to, V.BundleStore._log
def clean(*a, **k):
    out = real_clean(*a, **k)
    stage("cleaned")
    return out
def fit(self, *a, **k):
    stage("fit")
    return real_fit(self, *a, **k)
def copy(src, dst, **k):
    if not copied:
        copied.append(1)
        stage("copy")
    return real_copy(src, dst, **k)
def point(self, name):
    stage("renamed")
    real_point(self, name)
    stage("pointed")
def log(self, event):
    real_log(self, event)
    stage("logged")
R._remove_litter, api.EarlyExitModel.fit, V.shutil.copy2 = clean, fit, copy
V.BundleStore._point_to, V.BundleStore._log = point, log
sys.exit(cli.main(sys.argv[1:]))
"""


def prepare(root: Path, shared: Path, records: int = 400, seed: int = 3) -> dict:
    """A ResNet-20 bundle with every exit off (so a retrained candidate saves FLOPs and is published), a log of
    ``records`` logged CIFAR-10 test images, and a store with that bundle as v000001."""
    import selfxit
    from selfxit.fit.distill import DistillConfig
    from selfxit.ops.traffic import TrafficLog, TrafficRecord
    from selfxit.ops.versions import BundleStore
    from selfxit.zoo import load_backbone
    from selfxit.zoo.data import ImageFolderData

    torch.set_num_threads(1)
    model, info = load_backbone("cifar_resnet20")
    images = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=200 + records, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), candidate_layers=["conv1", "layer1", "layer2"])
    ee.collect(torch.stack([images[i][0] for i in range(200)]), root / "medial", augment_copies=0, progress=False)
    ee.fit(0.2, distill=DistillConfig(epochs=2), method="joint", progress=False)
    ee.thresholds = {}
    original = ee.save(root / "original")
    with TrafficLog(root / "log") as log:
        now = time.time()
        for i in range(200, 200 + records):
            log.append(TrafficRecord(timestamp=now - records + i, input=images[i][0], exit="final", source="collect"))
    store = BundleStore(root / "bundles")
    store.publish(original, reason="reliability: the bundle serving now")
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    return {"root": root, "model": model, "original": original, "log": root / "log", "store": store, "tmp": tmp}


def _owner_pid(name: str) -> int | None:
    """The pid in a temporary (``.x.tmp-[old-]host-pid-rand``) or work folder (``selfxit-host-pid-rand``) name."""
    rest = name.rsplit(TMP_MARK, 1)[1].removeprefix("old-") if TMP_MARK in name else name.removeprefix("selfxit-")
    parts = rest.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def litter(setup: dict) -> list[tuple[str, int | None]]:
    """(path, owner pid or None) of everything a run may leave behind: staging folders, markers and temporary links
    in the store, working folders under BUNDLES/.work, versions never made current (no publish line), anything in
    the runs' temp dir, and temporaries in the traffic log."""
    store = setup["store"]
    found = []
    for folder in (store.root, store.root / "versions", setup["log"]):
        if folder.is_dir():
            found += [(str(p), _owner_pid(p.name)) for p in folder.iterdir() if TMP_MARK in p.name]
    work = store.root / ".work"
    if work.is_dir():
        found += [(str(p), _owner_pid(p.name)) for p in work.iterdir()]
    found += [(str(p), None) for p in setup["tmp"].iterdir()]
    published = {e.get("version") for e in store.history() if e.get("event") == "publish"}
    publishers = {p.name[len(".publishing-"):].split(TMP_MARK)[0]: _owner_pid(p.name)
                  for p in store.root.iterdir() if p.name.startswith(".publishing-")} if store.root.is_dir() else {}
    found += [(str(v.path), publishers.get(v.name)) for v in store.versions()
              if v.name not in published and not v.current]
    return found


def _start(setup: dict, pause: str = "", epochs: int = EPOCHS) -> tuple[subprocess.Popen, queue.Queue]:
    store = setup["store"]
    cmd = [sys.executable, "-c", CHILD, "retrain", "--log", str(setup["log"]), "--model", "cifar_resnet20",
           "--out", str(store.root), "--since", "all", "--min-records", "100", "--tolerance", "0.2",
           "--epochs", str(epochs), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(setup["tmp"]),
           "RELIABILITY_PAUSE": pause, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put((time.monotonic(), line))
        lines.put((time.monotonic(), None))
    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, lines


def _stages(lines: queue.Queue, until: str | None, timeout: float) -> list[str]:
    """Stage names read so far; with ``until``, wait (up to ``timeout``) for that stage or the end of output."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            _, line = lines.get(timeout=max(0.0, deadline - time.monotonic()) if until else 0)
        except queue.Empty:
            return seen
        if line is None:
            return seen + ["<exit>"]
        if line.startswith("stage "):
            seen.append(line.split()[1])
            if seen[-1] == until:
                return seen


def _reset(setup: dict) -> None:
    """Make the original bundle current again if a run published a retrained one (so the next run has work)."""
    manifest = json.loads((setup["store"].current_path / "manifest.json").read_text())
    if (manifest.get("provenance") or {}).get("retrain"):
        setup["store"].publish(setup["original"], reason="reliability: reset to the original bundle")


def run_once(setup: dict, epochs: int = EPOCHS, timeout: float = 600) -> tuple[int, dict, dict[str, float]]:
    """One uninterrupted run: (exit code, its JSON result, seconds from the start to each stage and to 'exit')."""
    t = time.monotonic()
    proc, lines = _start(setup, epochs=epochs)
    proc.wait(timeout)
    out, times = [], {}
    while True:
        at, line = lines.get(timeout=10)
        if line is None:
            break
        if line.startswith("stage "):
            times.setdefault(line.split()[1], at - t)
        else:
            out.append(line)
    times["exit"] = time.monotonic() - t
    return proc.returncode, (json.loads("".join(out)) if proc.returncode == 0 else {}), times


def retrain_kills(setup: dict, kills: int, seed: int = 0, epochs: int = EPOCHS) -> dict:
    """``kills`` SIGKILLs of real retrain runs: a fifth at 'fit' and the publish steps in turn (at least one each
    when ``kills`` >= 5), the rest at uniformly random moments of a run. Returns the figures."""
    import selfxit
    rng = random.Random(seed)
    code, first, times = run_once(setup, epochs)  # calibration: when the work starts and ends, and that it publishes
    if code != 0 or not first.get("published"):
        raise RuntimeError(f"the calibration run did not publish (exit {code}): {first.get('reason')}")
    work_from, work_to = times["cleaned"], times["exit"]  # random kills fall in here, not in the imports
    targeted = ["fit", *PUBLISH_STAGES]
    n_targeted = min(kills, max(len(targeted), kills // 3))
    plans = [targeted[i % len(targeted)] for i in range(n_targeted)] + ["random"] * (kills - n_targeted)
    rng.shuffle(plans)
    figures = {"kills": kills, "run_s": round(times["exit"], 1), "work_s": round(work_to - work_from, 1), "loadable": 0, "stale_after_next_run": 0, "by_plan": {},
               "litter_seen_after_kills": 0, "publishes_in_kill_runs": 0}
    earlier_pids: set[int] = set()
    for plan in plans:
        _reset(setup)
        proc, lines = _start(setup, pause="" if plan == "random" else plan, epochs=epochs)
        if plan == "random":
            started = time.monotonic()
            seen = _stages(lines, "cleaned", 600)
            time.sleep(max(0.0, rng.uniform(work_from, work_to) - (time.monotonic() - started)))
            seen += _stages(lines, None, 0)
        else:
            seen = _stages(lines, plan, 600)
        proc.kill()
        proc.wait(60)
        seen += _stages(lines, "<none>", 5)
        figures["by_plan"][plan] = figures["by_plan"].get(plan, 0) + 1
        figures["publishes_in_kill_runs"] += "pointed" in seen
        selfxit.load(setup["store"].current_path, setup["model"])  # raises if current is not a working bundle
        figures["loadable"] += 1
        left = litter(setup)
        figures["litter_seen_after_kills"] += len(left)
        if "cleaned" in seen:  # this run did its start-up cleanup: nothing of earlier dead runs may remain
            figures["stale_after_next_run"] += sum(1 for _, pid in left if pid is None or pid in earlier_pids)
        earlier_pids.add(proc.pid)
    _reset(setup)
    code, last, _ = run_once(setup, epochs)  # the next run after the last kill
    left = litter(setup)
    figures.update(final_run_exit=code, final_run_removed=len(last.get("removed", [])), final_litter=len(left),
                   final_litter_paths=[p for p, _ in left][:10], versions=[v.name for v in setup["store"].versions()])
    selfxit.load(setup["store"].current_path, setup["model"])
    return figures


def retrain_sigterm(setup: dict, stages=("fit", "copy", "renamed"), epochs: int = EPOCHS) -> dict:
    """SIGTERM a real retrain run at each of ``stages``: it must exit 143 having removed its own working folder
    (and settled a publish in progress), so nothing at all is left, without any later run."""
    import selfxit
    figures = {"sigterms": 0, "exit_143": 0, "left_behind": 0, "loadable": 0}
    for stage in stages:
        _reset(setup)
        proc, lines = _start(setup, pause=stage, epochs=epochs)
        seen = _stages(lines, stage, 600)
        if seen[-1:] != [stage]:
            raise RuntimeError(f"the run never reached stage {stage!r} (stages: {seen})")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        figures["sigterms"] += 1
        figures["exit_143"] += code == 128 + signal.SIGTERM
        figures["left_behind"] += len([p for p, pid in litter(setup) if pid is None or not pid_alive(pid)])
        selfxit.load(setup["store"].current_path, setup["model"])
        figures["loadable"] += 1
    return figures
