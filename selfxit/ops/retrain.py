"""The nightly job: retrain the exits on logged traffic and publish them only if they pass validation.

Steps (``retrain``):

1. Read the log's records in the window (``since``), oldest first. The newest ``holdout_fraction``
   of them are held back for validation; the rest is the new traffic.
2. Rebuild the medial dataset from that traffic by re-running the frozen backbone with hooks (the
   logged softmax is not trusted: only some records have it, and the backbone is the reference).
3. Train heads warm-started from the current bundle's heads, recalibrate, re-choose exits and
   thresholds (the same ``fit`` as ``enable``, same tolerance unless given, and learned gates
   again if the current bundle has them).
4. Run the current and the candidate bundle on the held-back recent traffic and publish the
   candidate as a new version only if its agreement drop stays within the tolerance and it saves
   at least as many FLOPs as the current bundle — or the current bundle has itself broken the
   tolerance on that traffic (a stale bundle that breaks the promise is never kept for its savings).
   Otherwise the current bundle stays and the result says why.

Publishing goes through :class:`selfxit.ops.versions.BundleStore` (atomic; last N kept; rollback). The
candidate is built in a private working folder (``RetrainConfig.work_dir``, by default
``BUNDLES/.work/selfxit-<host>-<pid>-<random>``, never the system temp dir: at 224x224 the medial dataset is
tens of GB), so a job killed at any point leaves the published bundle untouched. The working folder
is removed on every exit path, SIGTERM and SIGINT included (:func:`selfxit.ops.signals.raise_on_signals`);
SIGKILL cannot be caught, so each run starts by removing what dead runs on this host left behind
(their working folders, the store's staging folders, the log's temporaries) and reports it in
``RetrainResult.removed``. A bundle records the digest of the window it was trained on; running the
job again on the same window with that bundle current does nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from selfxit.api import EarlyExitModel, load, wrap
from selfxit.core.atomic import remove_stale_work_dirs, work_dir
from selfxit.core.provenance import RetrainProvenance
from selfxit.evaluate.evaluation import evaluate
from selfxit.fit.augment import AugmentConfig
from selfxit.fit.distill import DistillConfig
from selfxit.ops.signals import raise_on_signals
from selfxit.ops.traffic import TrafficLog, record_input
from selfxit.ops.versions import BundleStore

WORK = ".work"  # default parent of the working folders, inside the bundle store
logger = logging.getLogger("selfxit.ops.retrain")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | float | None) -> float | None:
    """'24h', '30m', '7d', '90s' or a number of seconds -> seconds (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"duration {text!r} not understood: use e.g. 90s, 30m, 24h or 7d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@dataclass
class RetrainConfig:
    """Settings of one retrain run."""

    since: float | None = 86400.0  # seconds back from now; None: the whole log
    holdout_fraction: float = 0.3  # newest share of the window used only for validation
    tolerance: float | None = None  # default: the current bundle's
    delta: float = 0.1
    max_exits: int = 3
    min_records: int = 200
    seed: int = 0
    augment_copies: int | AugmentConfig | dict = 2  # flip/shift copies, or AugmentConfig (mixup, cutmix, jitter)
    epochs: int = 10  # warm-started heads need fewer epochs than fresh ones
    keep: int = 5  # published versions kept
    work_dir: str | Path | None = None  # parent of the run's working folder; default BUNDLES/.work
    # on Ray (selfxit.ops.ray_jobs, `retrain --ray`): record with this many backbone actors, heads as Ray tasks;
    # 0: all in this process. Ray must be initialised (selfxit.ops.ray_cluster.connect)
    ray_workers: int = 0

    def __post_init__(self):
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1); got {self.holdout_fraction}")
        if self.tolerance is not None and not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1); got {self.tolerance}")
        if self.min_records < 20:
            raise ValueError(f"min_records must be at least 20; got {self.min_records}")
        if self.ray_workers < 0:
            raise ValueError(f"ray_workers must be >= 0; got {self.ray_workers}")
        self.augment_copies = AugmentConfig.coerce(self.augment_copies)


@dataclass
class BundleCheck:
    """A bundle's numbers on the held-back recent traffic."""

    flops_fraction: float
    agreement: float
    exit_rates: dict[str, float]


@dataclass
class RetrainResult:
    """What the job did and why."""

    published: bool
    version: str | None  # the current version after the job
    reason: str
    records: int = 0
    train_records: int = 0
    holdout_records: int = 0
    tolerance: float | None = None
    window_digest: str | None = None
    current: BundleCheck | None = None
    candidate: BundleCheck | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # left by runs/publishers/writers that died, removed at start
    work_dir: str | None = None  # this run's working folder (removed when the run ends)
    guard: dict | None = None  # the live guard's state the job read (guard.json), None when there was none
    served: BundleCheck | None = None  # the current bundle at the guard's last scale: what was served while alarmed

    def to_dict(self) -> dict:
        return asdict(self)


GUARD_KEYS = ("active", "reason", "alarmed", "scale", "certified_scale", "tolerance", "alarmed_since",
              "bundle_version", "updated_at")


def read_guard_state(state_path: str | Path) -> dict:
    """The live guard's state file (``guard.json``, written by ``selfxit serve --guard``), reduced to what the
    nightly job reads: ``GUARD_KEYS`` plus ``tightens`` (the number of alarms). Raises FileNotFoundError when
    there is none and ValueError when it cannot be read."""
    path = Path(state_path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"the live guard state {path} could not be read ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"the live guard state {path} is not a JSON object")
    moves = state.get("moves") if isinstance(state.get("moves"), list) else []
    return {**{k: state.get(k) for k in GUARD_KEYS}, "path": str(path),
            "tightens": sum(isinstance(m, dict) and m.get("kind") == "tighten" for m in moves),
            "first_tighten": min((m["at"] for m in moves if isinstance(m, dict) and m.get("kind") == "tighten"
                                  and isinstance(m.get("at"), (int, float))), default=None)}


def guard_alarm(state_path: str | Path, log: str | Path, min_records: int) -> tuple[bool, str]:
    """(run now, why) for ``selfxit retrain --if-alarmed``: run only when the live guard's state file
    (``guard.json``, written by ``selfxit serve --guard``) says alarmed and the log holds at least
    ``min_records`` records since the alarm's first tighten."""
    path = Path(state_path)
    try:
        state = read_guard_state(path)
    except FileNotFoundError:
        return False, (f"no live guard state at {path} (serve with --guard and --log, or give --guard-state): "
                       "nothing to do")
    except ValueError as exc:
        return False, f"{exc}: nothing done"
    if not state.get("alarmed"):
        why = "not alarmed" if state.get("active", True) else f"off ({state.get('reason')})"
        return False, (f"the live guard is {why} (scale {state.get('scale')}, certified {state.get('certified_scale')}, "
                       f"updated {state.get('updated_at')}): nothing to do")
    since = state.get("alarmed_since")
    if since is None:
        since = state["first_tighten"]
    records = TrafficLog(log).count(since=since)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since)) + " UTC" if since else "?"
    if records < min_records:
        return False, (f"the live guard is alarmed since {when} (scale {state.get('scale')}, certified "
                       f"{state.get('certified_scale')}), but the log holds only {records} records since then "
                       f"(min_records {min_records}): nothing done yet")
    return True, (f"the live guard is alarmed since {when} (scale {state.get('scale')}, certified "
                  f"{state.get('certified_scale')}); {records} records logged since then")


def window_digest(records) -> str:
    """A digest naming the set of records a bundle was trained on."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.timestamp!r}|{r.source}|{r.prediction}|".encode())
        digest.update(r.encoded[:64] if r.encoded else (r.input.flatten()[:16].numpy().tobytes() if r.input is not None else b""))
    return digest.hexdigest()[:32]


def _check(ee: EarlyExitModel, inputs: torch.Tensor, reference: torch.Tensor) -> BundleCheck:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=128)
    result = evaluate(ee, loader, latency=False, progress=False, reference=reference)
    return BundleCheck(result.flops_fraction, result.agreement, result.exit_rates)


def served_check(current: EarlyExitModel, guard: dict | None, inputs: torch.Tensor,
                 reference: torch.Tensor) -> tuple[BundleCheck | None, str]:
    """The current bundle at the live guard's last scale on the held-back traffic, and a note for the reason.

    While alarmed the server answered with the family's thresholds at ``guard['scale']``, not the certified
    ones; this is what the guard bought on the recent traffic. It is reported, not used by the publish rule
    (:func:`decide`, unchanged). None when the guard was calm, watches another version, or the bundle has no
    family. ``current``'s thresholds are put back before it returns.
    """
    if not guard or not guard.get("alarmed") or not isinstance(guard.get("scale"), (int, float)):
        return None, ""
    family = current.family
    version = current.provenance.version
    if family is None or (guard.get("bundle_version") is not None and guard["bundle_version"] != version):
        return None, (f"; the live guard alarmed on version {guard.get('bundle_version')}, not the current "
                      f"{version}: its scale is not checked")
    scale = float(guard["scale"])
    if scale <= 0:  # the backbone alone: agrees with itself and spends all of it
        check = BundleCheck(1.0, 1.0, {})
    else:
        saved = dict(current.thresholds)
        try:
            current.thresholds = family.thresholds(scale)
            check = _check(current, inputs, reference)
        finally:
            current.thresholds = saved
    return check, (f"; the live guard was alarmed (scale {scale:g} of certified {family.scale}, "
                   f"{guard.get('tightens')} alarm(s)): there agreement {check.agreement:.4f} at FLOPs fraction "
                   f"{check.flops_fraction:.3f}")


def build_candidate(model: torch.nn.Module, current: EarlyExitModel, train_inputs: torch.Tensor, medial_dir: Path,
                    tolerance: float, config: RetrainConfig, progress: bool = True,
                    timings: dict[str, float] | None = None) -> EarlyExitModel:
    """Steps 2 and 3: record the medial dataset of ``train_inputs`` and fit the candidate bundle.

    The same candidates, head specs (warm-started from ``current``), seed and fit as ``enable``; with
    ``config.ray_workers`` the recording runs on an actor pool and each head trains as its own Ray task
    (:mod:`selfxit.ops.ray_jobs`), then the same fit reuses those heads, so both paths end in the same rule.
    """
    timings = {} if timings is None else timings
    t = time.perf_counter()
    candidate = wrap(model, torch.zeros(1, *current.input_shape), candidate_layers=[c.name for c in current.candidates])
    names = {c.name for c in candidate.candidates}
    specs = {n: spec for n, spec in current.head_specs.items() if n in names}
    distill = DistillConfig(epochs=config.epochs, seed=config.seed)
    if config.ray_workers:
        from selfxit.ops import ray_jobs
        candidate.medial = ray_jobs.record(candidate, train_inputs, medial_dir, config.seed, config.augment_copies,
                                           config.ray_workers)
        timings["collect"] = time.perf_counter() - t
        t = time.perf_counter()
        candidate.set_records(ray_jobs.train_heads(candidate, specs, distill, current.heads))
    else:
        candidate.collect(train_inputs, out_dir=medial_dir, seed=config.seed, augment_copies=config.augment_copies,
                          progress=progress)
        timings["collect"] = time.perf_counter() - t
        t = time.perf_counter()
    candidate.fit(tolerance, heads=specs, distill=distill, delta=config.delta, max_exits=config.max_exits,
                  progress=progress, warm_start=current.heads,
                  gate=current.gate)  # keep the serving bundle's kind of exit decision
    timings["fit"] = time.perf_counter() - t
    return candidate


def decide(current: BundleCheck, candidate: BundleCheck, tolerance: float) -> tuple[bool, str]:
    """The publish rule (see the module docstring); returns (publish, reason)."""
    drop, current_drop = 1 - candidate.agreement, 1 - current.agreement
    if drop > tolerance:
        return False, (f"candidate agreement {candidate.agreement:.4f} drops {drop:.4f} > tolerance {tolerance:g} "
                       "on held-back recent traffic")
    if current_drop > tolerance:
        return True, (f"current bundle breaks the tolerance on recent traffic (agreement {current.agreement:.4f}); "
                      f"candidate keeps it ({candidate.agreement:.4f}) at FLOPs fraction {candidate.flops_fraction:.3f}")
    if candidate.flops_fraction > current.flops_fraction:
        return False, (f"candidate saves fewer FLOPs on recent traffic ({candidate.flops_fraction:.3f} of the backbone "
                       f"vs {current.flops_fraction:.3f} for the current bundle)")
    return True, (f"candidate within tolerance (agreement {candidate.agreement:.4f}) and FLOPs fraction "
                  f"{candidate.flops_fraction:.3f} <= current {current.flops_fraction:.3f}")


def retrain(log: str | Path | TrafficLog, store: BundleStore, model: torch.nn.Module, info,
            config: RetrainConfig | None = None, current_bundle: str | Path | None = None,
            progress: bool = True, guard: dict | None = None) -> RetrainResult:
    """Run the nightly job once (see the module docstring).

    ``store`` receives the new version; ``current_bundle`` defaults to the store's current version
    (when the store is empty, ``current_bundle`` is published into it first as version 1, so that
    there is always a version to roll back to). ``info`` is the backbone's ``ModelInfo``. ``guard``: the
    live guard's state (:func:`read_guard_state`); it is kept in the result, and when alarmed the current
    bundle is also checked at the guard's last scale (:func:`served_check`, reported in the reason and the
    store's history). The publish rule does not change.

    SIGTERM and SIGINT raise :class:`selfxit.ops.signals.Interrupted` (a SystemExit) while it runs, so the
    working folder is removed and a publish in progress completes or is undone.
    """
    config = config or RetrainConfig()
    with raise_on_signals():
        return _retrain(log, store, model, info, config, current_bundle, progress, guard)


def _remove_litter(store: BundleStore, work_root: Path) -> list[str]:
    """What dead runs on this host left: working folders, the store's staging folders and markers."""
    removed = [str(p) for p in store.clean()] + [str(p) for p in remove_stale_work_dirs(work_root)]
    if removed:
        logger.info("retrain: removed %d item(s) left by runs that died: %s", len(removed), ", ".join(removed[:10]))
    return removed


def _retrain(log_location, store: BundleStore, model: torch.nn.Module, info, config: RetrainConfig,
             current_bundle, progress: bool, guard: dict | None = None) -> RetrainResult:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    work_root = Path(config.work_dir) if config.work_dir is not None else store.root / WORK
    removed = _remove_litter(store, work_root)
    if store.current() is None:
        if current_bundle is None:
            raise ValueError(f"{store.root} has no published bundle: pass the bundle serving now (--bundle)")
        store.publish(current_bundle, reason="initial version (imported by retrain)")
    current_path = Path(current_bundle) if current_bundle is not None else store.current_path
    current = load(current_path, model)
    tolerance = config.tolerance if config.tolerance is not None else current.tolerance
    if tolerance is None:
        raise ValueError("the current bundle records no tolerance: pass one (--tolerance)")
    traffic = log_location if isinstance(log_location, TrafficLog) else TrafficLog(log_location)
    if not isinstance(log_location, TrafficLog):
        removed += traffic.removed  # the log's own open removed what its dead writers left
    since = time.time() - config.since if config.since is not None else None
    records = sorted(traffic.read(since=since), key=lambda r: r.timestamp)
    digest = window_digest(records)
    result = RetrainResult(False, store.current(), "", len(records), tolerance=tolerance, window_digest=digest,
                           removed=removed, guard=guard)
    if len(records) < config.min_records:
        result.reason = f"only {len(records)} records in the window (min_records {config.min_records}): nothing done"
        return result
    if current.provenance.retrain is not None and current.provenance.retrain.window_digest == digest:
        result.reason = "the current bundle was already retrained on exactly this window: nothing to do"
        return result
    inputs = torch.stack([record_input(r, info) for r in records])
    timings["read_log"] = time.perf_counter() - start
    cut = int(round(len(records) * (1 - config.holdout_fraction)))
    train_inputs, holdout = inputs[:cut], inputs[cut:]
    result.train_records, result.holdout_records = len(train_inputs), len(holdout)

    work = None
    try:
        work = work_dir(work_root)
        result.work_dir = str(work)
        candidate = build_candidate(model, current, train_inputs, work / "medial", tolerance, config, progress,
                                    timings)
        t = time.perf_counter()
        with torch.inference_mode():  # the backbone's answers, once for both bundles
            reference = torch.cat([current.backbone(x).argmax(1) for x in holdout.split(128)])
        result.current = _check(current, holdout, reference)
        result.candidate = _check(candidate, holdout, reference)
        result.served, guard_note = served_check(current, guard, holdout, reference)
        timings["validate"] = time.perf_counter() - t
        publish, reason = decide(result.current, result.candidate, tolerance)
        if not candidate.thresholds:
            publish, reason = False, ("the candidate has no exit that keeps the tolerance on this window "
                                      "(too little traffic, or heads near chance)")
        reason += guard_note
        result.reason = reason
        if publish:
            candidate.provenance = replace(current.provenance, version=None, retrain=RetrainProvenance(
                window_digest=digest, records=len(records), holdout=len(holdout), parent=current.provenance.version,
                window=[records[0].timestamp, records[-1].timestamp],
                current_check=asdict(result.current), candidate_check=asdict(result.candidate)))
            staged = candidate.save(work / "bundle")
            result.version = store.publish(staged, reason=reason)
            result.published = True
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():
                warnings.warn(f"retrain: could not remove its working folder {work}; the next run removes it",
                              stacklevel=2)
        timings["total"] = time.perf_counter() - start
        result.seconds = {k: round(v, 1) for k, v in timings.items()}
    return result


def summary(result: RetrainResult) -> str:
    """A few readable lines about a retrain run."""
    lines = [("PUBLISHED " + str(result.version)) if result.published else f"kept {result.version}",
             f"reason: {result.reason}",
             f"records in window: {result.records} (train {result.train_records}, held back {result.holdout_records})"]
    for name, check in (("current", result.current), ("candidate", result.candidate), ("served", result.served)):
        if check is not None:
            lines.append(f"{name:<10} FLOPs fraction {check.flops_fraction:.3f}   agreement {check.agreement:.4f}   "
                         f"(tolerance {result.tolerance:g})")
    if result.guard:
        g = result.guard
        lines.append(f"live guard ({g.get('path')}): {'ALARMED' if g.get('alarmed') else 'calm'}, scale "
                     f"{g.get('scale')} of certified {g.get('certified_scale')}, {g.get('tightens')} alarm(s), "
                     f"updated {g.get('updated_at')}")
    if result.seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:g}" for k, v in result.seconds.items()))
    if result.removed:
        shown = ", ".join(result.removed[:5]) + (f" and {len(result.removed) - 5} more" if len(result.removed) > 5 else "")
        lines.append(f"removed {len(result.removed)} item(s) left by runs that died: {shown}")
    return "\n".join(lines)
