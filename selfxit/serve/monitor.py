"""Live monitoring and traffic logging for a serving early-exit model.

Once a sample exits early, nobody knows what the backbone would have said, so agreement cannot be
measured on served traffic for free. :class:`TrafficMonitor` makes it measurable: a fraction of the
items (``shadow_fraction``) is also run through the whole backbone after its answer has gone out,
and live agreement (overall and per exit) is counted on those. Items answered by the backbone
itself agree by definition and need no extra run. Exit hit rates are counted on every item.

A fraction of the items (``log_fraction``; shadow items are always logged when a log is set) is
appended to a :class:`~selfxit.ops.traffic.TrafficLog` with the input (the encoded image bytes when
that is what arrived, else the tensor), the backbone's softmax when it is known (answered by the
backbone, or shadow-run), the exit, the prediction and the bundle version. A log that fails (disk
full, permissions) is switched off with the reason kept for ``/healthz``: serving goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from selfxit.core.runtime import FINAL, EarlyExitOutput
from selfxit.ops.traffic import TrafficLog, TrafficRecord

log = logging.getLogger("selfxit.serve.monitor")


@dataclass
class MonitorConfig:
    """What to log and shadow-run (fractions of served items)."""

    log: str | None = None  # traffic log directory or fsspec URL; None: no logging
    log_fraction: float = 0.1
    shadow_fraction: float = 0.02
    seed: int | None = None

    def __post_init__(self):
        for name in ("log_fraction", "shadow_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")


class TrafficMonitor:
    """Counts exit hit rates and shadow agreement, and logs sampled items (thread-safe)."""

    def __init__(self, config: MonitorConfig | None = None, traffic_log: TrafficLog | None = None):
        self.config = config or MonitorConfig()
        if traffic_log is None and self.config.log:
            traffic_log = TrafficLog(self.config.log)
        self._log = traffic_log
        self.log_error: str | None = None
        self._rng = np.random.default_rng(self.config.seed)
        self._lock = threading.Lock()
        self.items = 0
        self.hits: dict[str, int] = {}
        self.shadow_items: dict[str, int] = {}
        self.shadow_agree: dict[str, int] = {}
        self.logged = 0
        self.guard = None  # a selfxit.serve.guarding.GuardKeeper when the server runs with --guard

    def shadow_fraction(self, ee=None) -> float:
        """The fraction of items shadow-run now: the guard's (raised while alarmed) when it watches ``ee``."""
        fraction = self.guard.shadow_fraction(ee) if self.guard is not None and ee is not None else None
        return self.config.shadow_fraction if fraction is None else fraction

    def observe(self, x: torch.Tensor, output: EarlyExitOutput, exit_names: list[str], backbone,
                bundle_version: str | None, encoded: list[tuple[bytes, str] | None] | None = None,
                ee=None) -> None:
        """Account for one answered micro-batch ``x`` (call after the answers have gone out).

        ``ee``: the model that answered; with a guard watching it, every shadow item (those the backbone
        answered too) runs the guard's no-shrink pass instead of the plain backbone, and feeds the guard.
        """
        n = len(x)
        exits = output.exit.cpu().numpy()
        names = ["final" if e == FINAL else exit_names[e] for e in exits]
        shadow = self._rng.random(n) < self.shadow_fraction(ee)
        logged = (self._rng.random(n) < self.config.log_fraction) | shadow if self._log is not None else np.zeros(n, bool)
        backbone_probs: dict[int, np.ndarray] = {}
        final = exits == FINAL
        for i in np.flatnonzero(final & (shadow | logged)):
            backbone_probs[i] = output.probabilities[i].float().cpu().numpy()  # the backbone's own softmax
        early = np.flatnonzero(shadow & ~final)
        guarded = self.guard.bundle_for(ee) if self.guard is not None and ee is not None else None
        if guarded is not None and shadow.any():
            rows_all = np.flatnonzero(shadow)
            with torch.inference_mode():
                run = guarded.shadow(x[torch.as_tensor(rows_all, device=x.device)])
                probs = run.logits.float().softmax(1).cpu().numpy()
            for j, i in enumerate(rows_all):
                backbone_probs.setdefault(int(i), probs[j])
            self.guard.observe(ee, run)
        elif len(early):
            with torch.inference_mode():
                rows = torch.as_tensor(early, device=x.device)
                batch = x[rows]
                probs = backbone(batch if len(batch) > 1 else batch.expand(2, *batch.shape[1:]))[:len(batch)].softmax(1)
            for i, p in zip(early, probs.float().cpu().numpy()):
                backbone_probs[i] = p
        predictions = output.predictions.cpu().numpy()
        with self._lock:
            self.items += n
            for name in names:
                self.hits[name] = self.hits.get(name, 0) + 1
            for i in np.flatnonzero(shadow):
                name = names[i]
                self.shadow_items[name] = self.shadow_items.get(name, 0) + 1
                self.shadow_agree[name] = self.shadow_agree.get(name, 0) + int(backbone_probs[i].argmax() == predictions[i])
        if logged.any():
            self._append(x, logged, names, predictions, backbone_probs, shadow, bundle_version, encoded)

    def _append(self, x, logged, names, predictions, backbone_probs, shadow, bundle_version, encoded) -> None:
        if self._log is None:
            return
        now = time.time()
        try:
            for i in np.flatnonzero(logged):
                blob = encoded[i] if encoded else None
                self._log.append(TrafficRecord(
                    timestamp=now, input=None if blob else x[i].detach().cpu().clone(),
                    encoded=blob[0] if blob else None, content_type=blob[1] if blob else None,
                    backbone_probs=backbone_probs.get(i), exit=names[i], prediction=int(predictions[i]),
                    bundle_version=bundle_version, shadow=bool(shadow[i]), source="serve"))
                with self._lock:
                    self.logged += 1
        except OSError as exc:  # TrafficLogError included: stop logging, keep serving
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        self.log_error = f"{type(exc).__name__}: {exc}"
        log.error("traffic logging switched off, serving goes on: %s", self.log_error)
        broken, self._log = self._log, None
        try:
            broken.close()
        except Exception:
            pass

    def flush(self) -> None:
        """Make logged records durable now (the log also flushes itself every second or so)."""
        if self._log is not None:
            try:
                self._log.flush()
            except OSError as exc:
                self._disable(exc)

    def close(self) -> None:
        """Flush and close the log."""
        self.flush()
        if self._log is not None:
            self._log.close()
            self._log = None

    def live_agreement(self) -> tuple[float, int] | None:
        """(agreement with the backbone on shadow-run items, number of them), or None before any."""
        with self._lock:
            total = sum(self.shadow_items.values())
            return (sum(self.shadow_agree.values()) / total, total) if total else None

    def counts(self) -> dict:
        """The raw counts (items, hits, shadow items and agreements per exit, logged), so that several
        monitors (Ray Serve replicas) can be summed before rates are taken (see selfxit.serve.ray_state)."""
        with self._lock:
            return {"items": self.items, "hits": dict(self.hits), "shadow_items": dict(self.shadow_items),
                    "shadow_agree": dict(self.shadow_agree), "logged": self.logged,
                    "logging": self._log is not None, "log_error": self.log_error}

    def snapshot(self) -> dict:
        """Everything measured so far, JSON-ready."""
        guarded = self.guard.current if self.guard is not None else None
        with self._lock:
            total_shadow = sum(self.shadow_items.values())
            return {
                "items": self.items,
                "hit_rates": {k: v / self.items for k, v in self.hits.items()} if self.items else {},
                "shadow_samples": total_shadow,
                "live_agreement": sum(self.shadow_agree.values()) / total_shadow if total_shadow else None,
                "exit_agreement": {k: {"agreement": self.shadow_agree[k] / v, "samples": v}
                                   for k, v in self.shadow_items.items()},
                "logging": {"enabled": self._log is not None, "location": self.config.log,
                            "fraction": self.config.log_fraction, "logged": self.logged, "error": self.log_error},
                "shadow_fraction": self.config.shadow_fraction if guarded is None else guarded.guard.shadow_fraction,
                **({"guard": self.guard.snapshot()} if self.guard is not None else {}),
            }
