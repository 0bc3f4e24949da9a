"""What Ray Serve replicas share: where their bundle comes from, and one board of every replica's state.

Why a board: a request reaches one replica, but ``/healthz`` must say which version *each* replica serves, and
live agreement, hit rates and ``/metrics`` must cover all of them. Each replica reports its state (bundle,
reload outcome, raw monitor counts, its Prometheus families) to one named actor, :class:`ReplicaBoard`, about
once a second; any replica answers from the board. An entry not refreshed for ``STALE_S`` is shown as stale (a
replica that died; Ray Serve starts a replacement under a new id).

Bundles come from a folder or any fsspec URL (:class:`BundleSource`): a bundle store (``versions/`` and
``current``, :mod:`selfxit.ops.versions`) is followed through ``current`` (or pinned to one version), a plain
bundle folder is followed as it is. A replica copies the manifest and heads into its own working folder before
loading them, and re-reads the manifest afterwards, so a bundle replaced while it was being copied is never
loaded half old, half new.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from selfxit.core.atomic import remove_stale_work_dirs, work_dir
from selfxit.core.bundle import MANIFEST, WEIGHTS
from selfxit.fit.medial.store import fs_of
from selfxit.serve.metrics import monitor_gauges

BOARD_NAMESPACE = "selfxit"
STALE_S = 10.0  # a replica that has not reported for this long is shown as stale


class BundleSource:
    """The bundle a replica follows: ``location`` (folder or fsspec URL) is a bundle store or one bundle."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.fs, self.path, _ = fs_of(self.location)
        self.scratch = Path(tempfile.gettempdir()) / "selfxit-ray"
        remove_stale_work_dirs(self.scratch)  # what replicas killed on this host left

    def is_store(self) -> bool:
        return self.fs.exists(f"{self.path}/current/{MANIFEST}")

    def folder(self, version: str | None = None) -> str:
        """The folder to load: the store's ``current`` (or ``versions/<version>``), or the bundle itself."""
        if version is not None:
            return f"{self.path}/versions/{version}"
        return f"{self.path}/current" if self.is_store() else self.path

    def digest(self, version: str | None = None) -> str:
        """A digest of the manifest to follow (changes on every publish); OSError when it cannot be read."""
        return hashlib.sha256(self.fs.cat_file(f"{self.folder(version)}/{MANIFEST}")).hexdigest()[:16]

    def fetch(self, version: str | None = None, attempts: int = 3) -> tuple[Path, str]:
        """Copy the bundle into a private working folder: (that folder, its manifest digest). The manifest is
        read before and after the heads; a bundle replaced meanwhile is copied again."""
        folder = self.folder(version)
        for _ in range(attempts):
            before = self.fs.cat_file(f"{folder}/{MANIFEST}")
            heads = self.fs.cat_file(f"{folder}/{WEIGHTS}")
            if self.fs.cat_file(f"{folder}/{MANIFEST}") == before:
                local = work_dir(self.scratch)
                (local / MANIFEST).write_bytes(before)
                (local / WEIGHTS).write_bytes(heads)
                return local, hashlib.sha256(before).hexdigest()[:16]
        raise OSError(f"{self.location}: the bundle kept changing while it was copied ({attempts} attempts)")

    @staticmethod
    def discard(local: Path | None) -> None:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)


def board_name(app_name: str) -> str:
    return f"selfxit-board-{app_name}"


def get_board(app_name: str, create: bool = False):
    """The board actor of application ``app_name`` (created, detached, when ``create``)."""
    import ray

    from selfxit.serve.ray_board import ReplicaBoard
    if create:
        return ReplicaBoard.options(name=board_name(app_name), namespace=BOARD_NAMESPACE, lifetime="detached",
                                    get_if_exists=True, num_cpus=0).remote()
    return ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE)


def kill_board(app_name: str) -> None:
    """Remove the board of ``app_name`` (it is detached: it outlives the driver that created it)."""
    import ray
    try:
        ray.kill(get_board(app_name))
    except ValueError:  # no such actor
        pass


def fresh(entries: dict[str, dict], now: float | None = None) -> dict[str, dict]:
    """The board's entries with ``age_s`` and ``stale`` added."""
    now = time.time() if now is None else now
    out = {}
    for rid, entry in entries.items():
        age = now - entry.get("reported_at", 0.0)
        out[rid] = {**entry, "age_s": round(age, 1), "stale": age > STALE_S}
    return out


def _add(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def aggregate(entries: dict[str, dict]) -> dict:
    """The monitor snapshot over every live replica: counts summed, then rates (the single server's keys)."""
    items, logged = 0, 0
    hits: dict[str, int] = {}
    shadow: dict[str, int] = {}
    agree: dict[str, int] = {}
    errors = []
    live = [e for e in entries.values() if not e.get("stale")]
    for entry in live:
        c = entry["counts"]
        items += c["items"]
        logged += c["logged"]
        _add(hits, c["hits"])
        _add(shadow, c["shadow_items"])
        _add(agree, c["shadow_agree"])
        if c.get("log_error"):
            errors.append(f"{entry['replica']}: {c['log_error']}")
    total = sum(shadow.values())
    return {"replicas": len(live), "items": items,
            "hit_rates": {k: v / items for k, v in hits.items()} if items else {},
            "shadow_samples": total, "live_agreement": sum(agree.values()) / total if total else None,
            "exit_agreement": {k: {"agreement": agree[k] / v, "samples": v} for k, v in shadow.items()},
            "logging": {"enabled": any(e["counts"]["logging"] for e in live), "logged": logged,
                        "errors": errors}}


def metrics_text(entries: dict[str, dict]) -> bytes:
    """Prometheus text over every live replica: each replica's counters and histograms with a ``replica``
    label, and the monitor's gauges from the summed counts (queue items summed, generation the lowest served)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric

    live = {rid: e for rid, e in entries.items() if not e.get("stale")}
    snapshot = aggregate(live)
    agreement = snapshot["live_agreement"]
    gauges = monitor_gauges({**snapshot, "logging": {"logged": snapshot["logging"]["logged"],
                                                     "enabled": snapshot["logging"]["enabled"]}},
                            None if agreement is None else (agreement, snapshot["shadow_samples"]),
                            sum(e.get("queue_items", 0) for e in live.values()),
                            min((e["bundle"]["generation"] for e in live.values()), default=0))

    class Merged:
        def collect(self):
            families: dict[str, Metric] = {}
            for rid, entry in sorted(live.items()):
                for family in entry.get("families", []):
                    merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                    for s in family.samples:
                        merged.add_sample(s.name, {**s.labels, "replica": rid}, s.value)
            yield from families.values()
            yield GaugeMetricFamily("selfxit_replicas", "Replicas reporting to the board.", value=len(live))
            for name, (help_text, value) in gauges.items():
                if isinstance(value, list):
                    keys = sorted({k for labels, _ in value for k in labels})
                    family = GaugeMetricFamily(name, help_text, labels=keys)
                    for labels, number in value:
                        family.add_metric([labels.get(k, "") for k in keys], float(number))
                    yield family
                else:
                    yield GaugeMetricFamily(name, help_text, value=float(value))

    registry = CollectorRegistry()
    registry.register(Merged())
    return generate_latest(registry)
