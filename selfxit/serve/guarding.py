"""The live guard in a server: shadow samples in, threshold moves out, state for the nightly job.

:class:`GuardKeeper` owns one :class:`~selfxit.serve.live_guard.LiveGuard` per served bundle (built from the
bundle's :class:`~selfxit.core.exits.CertifiedFamily` when the bundle is loaded, so a reload or a publish
restarts the guard from the new family). Its shadow runner is an
:class:`~selfxit.core.runtime.EarlyExitRunner` over the family's exits with every threshold at +inf and
``shrink=False``: one forward pass gives the backbone's logits and every family exit's top-1 and
max-softmax score, so the guard costs only the small heads on top of the monitor's usual shadow run.

Threading: :meth:`GuardKeeper.observe` and :meth:`GuardKeeper.apply` run on the server's single worker thread,
after a micro-batch's answers went out and before the next batch is taken, so new thresholds always fall
between two batches and no request is dropped. A move is logged (``selfxit.serve``), counted in
``/metrics`` and written to the state file (``guard.json``, atomically) for ``selfxit retrain --if-alarmed``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from selfxit.core.atomic import write_text
from selfxit.core.runtime import EarlyExitOutput, EarlyExitRunner
from selfxit.serve.live_guard import GuardConfig, GuardMove, LiveGuard

log = logging.getLogger("selfxit.serve")
STATE_FILE = "guard.json"


class GuardRefused(ValueError):
    """A bundle the guard cannot watch (no certified family, no certified scale, learned gates, plain)."""


def guard_problem(ee) -> str | None:
    """Why ``ee`` cannot be guarded, or None when it can."""
    family = getattr(ee, "family", None)
    if family is None:
        return ("the bundle has no certified family (fitted with a method other than 'certified', or by an older "
                "version): refit it with method 'certified' (as `selfxit enable` does) or serve it without --guard")
    if family.scale is None:
        return ("the bundle certified no scale (no exit passed the test: the backbone answers alone), so there is "
                "nothing to guard: serve it without --guard")
    if getattr(ee, "gate", "confidence") == "learned":
        return ("--guard does not support learned-gate bundles yet: the runtime's no-shrink pass records each exit's "
                "max-softmax, not its gate score, which the family's thresholds apply to")
    missing = [layer for layer in family.shape if layer not in ee.records]
    if missing:
        return f"the certified family names exits {missing} that have no trained head in the bundle"
    return None


class BundleGuard:
    """The guard of one served bundle: its LiveGuard and its shadow runner."""

    def __init__(self, ee, config: GuardConfig):
        problem = guard_problem(ee)
        if problem is not None:
            raise GuardRefused(problem)
        self.ee = ee
        self.guard = LiveGuard(ee.family, config)
        self.version = getattr(getattr(ee, "provenance", None), "version", None)
        records = [replace(ee.records[layer], threshold=float("inf")) for layer in self.guard.layers]
        self.runner = EarlyExitRunner(ee.backbone, records, ee.num_classes)  # built (and traced) here, at load
        self.pending: dict[str, float] | None = None  # thresholds to serve from the next batch on
        self.alarmed_since: float | None = None

    def shadow(self, x: torch.Tensor) -> EarlyExitOutput:
        """One no-shrink pass: backbone logits (``logits``) and every family exit's top-1 and score."""
        batch = x if len(x) > 1 else x.expand(2, *x.shape[1:])  # a batch of one takes other CPU kernels
        out = self.runner(batch, shrink=False)
        assert out.exit_predictions is not None and out.exit_confidence is not None  # recorded without shrinking
        n = len(x)
        return EarlyExitOutput(out.predictions[:n], out.probabilities[:n], out.logits[:n], out.confidence[:n],
                               out.exit[:n], out.exit_predictions[:, :n], out.exit_confidence[:, :n])


class GuardKeeper:
    """The server's live guard across bundle reloads (see the module docstring)."""

    def __init__(self, alpha: float, base_shadow: float, max_shadow: float, state_path: str | Path | None = None,
                 on_move: Callable[[str], None] | None = None):
        self.config = GuardConfig(alpha=alpha, base_shadow=base_shadow, max_shadow=max_shadow)
        self.state_path = Path(state_path) if state_path else None
        self.on_move = on_move
        self.current: BundleGuard | None = None
        self.reason: str | None = "no bundle yet"  # why the served bundle is not guarded
        self._current_ee = None
        self._prepared: tuple[object, BundleGuard | None, str | None] | None = None
        self._lock = threading.Lock()
        self.state_error: str | None = None

    @property
    def started(self) -> bool:
        """Whether a bundle has served under this keeper yet (the first one must be guardable)."""
        return self._current_ee is not None

    # ---- bundles --------------------------------------------------------------------------------------
    def prepare(self, ee, strict: bool = False) -> None:
        """Build the guard for a bundle about to serve (at load, while nothing else runs torch modules).

        ``strict`` (the first bundle): refuse one that cannot be guarded. A reloaded one is served unguarded
        instead, with the reason in ``/healthz`` (a retrain may publish a bundle that certified nothing).
        """
        try:
            bundle_guard, reason = BundleGuard(ee, self.config), None
            with torch.inference_mode():
                bundle_guard.shadow(torch.zeros(2, *ee.input_shape))  # warm: the first shadow run costs no setup
        except GuardRefused as exc:
            if strict:
                raise
            bundle_guard, reason = None, str(exc)
            log.warning("live guard off for the new bundle: %s", reason)
        with self._lock:
            self._prepared = (ee, bundle_guard, reason)
        if strict:
            self.bundle_for(ee)

    def bundle_for(self, ee) -> BundleGuard | None:
        """The guard of the bundle ``ee`` (switching to it, and restarting the guard, when it is new)."""
        with self._lock:
            if ee is self._current_ee:
                return self.current
            prepared = self._prepared
            if prepared is not None and prepared[0] is ee:
                _, self.current, self.reason = prepared
            else:  # not prepared through the loader (should not happen): guard it unwarmed if it can be
                problem = guard_problem(ee)
                self.current, self.reason = (None, problem) if problem else (BundleGuard(ee, self.config), None)
            self._current_ee = ee
            current = self.current
        if current is not None:
            log.warning("live guard (re)started on bundle %s at certified scale %g (alpha %g)",
                        current.version, current.guard.scale, self.config.alpha)
        self.save()
        return current

    # ---- the worker's calls ------------------------------------------------------------------------------
    def shadow_fraction(self, ee) -> float | None:
        """The monitor's shadow fraction now (raised while alarmed), or None when ``ee`` is not guarded."""
        bundle_guard = self.bundle_for(ee)
        return None if bundle_guard is None else bundle_guard.guard.shadow_fraction

    def observe(self, ee, out: EarlyExitOutput) -> list[GuardMove]:
        """Feed the shadow samples of one pass (:meth:`BundleGuard.shadow`); returns the moves they caused."""
        bundle_guard = self.bundle_for(ee)
        if bundle_guard is None:
            return []
        assert out.exit_predictions is not None and out.exit_confidence is not None
        backbone = out.logits.argmax(1).tolist()
        predictions = out.exit_predictions.t().tolist()
        scores = out.exit_confidence.float().t().tolist()
        moves = []
        for b, p, s in zip(backbone, predictions, scores):
            move = bundle_guard.guard.observe(b, p, s)
            if move is not None:
                moves.append(move)
                self._moved(bundle_guard, move)
        return moves

    def _moved(self, bundle_guard: BundleGuard, move: GuardMove) -> None:
        guard = bundle_guard.guard
        bundle_guard.pending = guard.thresholds()
        if move.kind == "tighten" and bundle_guard.alarmed_since is None:
            bundle_guard.alarmed_since = move.at
        if not guard.alarmed:
            bundle_guard.alarmed_since = None
        log.warning("live guard %s: scale %g -> %g (certified %g) after %d shadow samples, wealth %.3g; "
                    "thresholds now %s", move.kind, move.from_scale, move.to_scale, guard.family.scale,
                    move.shadow_samples, move.wealth,
                    {k: round(v, 4) for k, v in bundle_guard.pending.items()})
        if self.on_move is not None:
            self.on_move(move.kind)
        self.save()

    def apply(self, served) -> bool:
        """Serve the thresholds of the last move from the next batch on (worker thread, between batches)."""
        bundle_guard = self.current
        if bundle_guard is None or bundle_guard.pending is None or bundle_guard.ee is not served.ee:
            return False
        served.ee.thresholds, bundle_guard.pending = bundle_guard.pending, None
        served.exit_names = list(served.ee.thresholds)
        served.describe = {**served.describe,
                           "exits": [{"layer": n, "threshold": t} for n, t in served.ee.thresholds.items()]}
        return True

    # ---- what is shown and kept ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        bundle_guard = self.current
        if bundle_guard is None:
            return {"active": False, "reason": self.reason, "alarmed": False, "scale": None,
                    "certified_scale": None, "state_file": str(self.state_path) if self.state_path else None}
        return {"active": True, **bundle_guard.guard.snapshot(), "alarmed_since": bundle_guard.alarmed_since,
                "bundle_version": bundle_guard.version,
                "state_file": str(self.state_path) if self.state_path else None, "state_error": self.state_error}

    def gauges(self) -> dict:
        snap = self.snapshot()
        if not snap["active"]:
            return {"selfxit_guard_active": ("1 while the live guard watches the served bundle.", 0)}
        return {
            "selfxit_guard_active": ("1 while the live guard watches the served bundle.", 1),
            "selfxit_guard_alarmed": ("1 while the guard serves below the certified scale.", int(snap["alarmed"])),
            "selfxit_guard_scale": ("Scale of the certified family served now (smaller is stricter).", snap["scale"]),
            "selfxit_guard_certified_scale": ("Scale the bundle certified.", snap["certified_scale"]),
            "selfxit_guard_shadow_fraction": ("Shadow fraction the guard asks for now.", snap["shadow_fraction"]),
            "selfxit_guard_shadow_samples": ("Shadow samples the guard has seen on this bundle.",
                                             snap["shadow_samples"]),
            "selfxit_guard_alarm_wealth": ("Wealth of the guard's alarm test (alarm at 1/alpha).",
                                           snap["alarm_wealth"]),
        }

    def state(self) -> dict:
        bundle_guard = self.current
        guard = bundle_guard.guard if bundle_guard else None
        now = time.time()
        return {"active": guard is not None, "reason": self.reason,
                "alarmed": bool(guard and guard.alarmed), "scale": guard.scale if guard else None,
                "certified_scale": guard.family.scale if guard else None,
                "tolerance": guard.family.tolerance if guard else None, "alpha": self.config.alpha,
                "alarmed_since": bundle_guard.alarmed_since if bundle_guard else None,
                "moves": [vars(m) for m in guard.moves] if guard else [],
                "bundle_version": bundle_guard.version if bundle_guard else None,
                "updated_at": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
                "updated_ts": now}

    def save(self) -> None:
        """Write the state file atomically (never fails the server: an error is kept for /healthz)."""
        if self.state_path is None:
            return
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.state_path, json.dumps(self.state(), indent=1))
            self.state_error = None
        except OSError as exc:
            self.state_error = f"{type(exc).__name__}: {exc}"
            log.error("could not write the guard state %s: %s", self.state_path, self.state_error)

    def close(self) -> None:
        self.save()


def keeper_for(config, metrics, monitor) -> GuardKeeper | None:
    """The keeper of a server whose ``config.guard`` is on (None otherwise), wired to its metrics and monitor."""
    if not config.guard:
        return None
    keeper = GuardKeeper(config.guard_alpha, config.shadow_fraction, config.guard_max_shadow_fraction,
                         default_state_path(config.log, config.guard_state), metrics.guard_move)
    metrics.guard_enabled()
    metrics.add_gauges(keeper.gauges)
    monitor.guard = keeper
    return keeper


def default_state_path(log_location: str | None, explicit: str | Path | None) -> Path | None:
    """``--guard-state``, else ``LOG/guard.json`` for a local traffic log folder, else None."""
    if explicit:
        return Path(explicit)
    if log_location and "://" not in str(log_location):
        return Path(log_location) / STATE_FILE
    return None
