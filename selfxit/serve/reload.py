"""The bundle being served, and switching to a new one without dropping a request (hot reload).

:class:`Reloader` holds the :class:`Served` bundle. A reload (``POST /v1/reload``, or the folder watcher
seeing the manifest or heads file change) loads the bundle off the event loop, refuses it if it does not
load or does not fit the running server (kept in ``last_reload`` for ``/healthz``; the old bundle keeps
serving), and otherwise replaces ``served`` in one assignment: the worker reads it once per micro-batch,
so a switch always falls between two batches.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfxit.core.bundle import MANIFEST, WEIGHTS
from selfxit.serve.requests import ApiError

log = logging.getLogger("selfxit.serve.app")  # the server logs under one name, as before the split


class BundleLoader:
    """Loads the backbone once; each call loads the bundle folder for it (plain: exits switched off).

    The backbone stays in memory across reloads: a new bundle only brings heads and thresholds.
    """

    def __init__(self, bundle: str | Path, model: str, weights: str | Path | None = None, plain: bool = False):
        from selfxit.zoo import load_backbone
        backbone, info = load_backbone(model, weights)
        self._set(bundle, backbone, info, plain)

    @classmethod
    def from_backbone(cls, bundle: str | Path, backbone, info=None, plain: bool = False, runtime=None,
                      device: str = "cpu") -> BundleLoader:
        """A loader for a backbone already loaded (e.g. by the command line's --model/--weights); ``runtime``
        (a RuntimeConfig, None: the hook runtime) and ``device`` are applied to every bundle it loads."""
        loader = cls.__new__(cls)
        loader._set(bundle, backbone, info, plain)
        loader.runtime, loader.device = runtime, device
        return loader

    def _set(self, bundle, backbone, info, plain: bool) -> None:
        self.bundle, self.plain, self.backbone, self.info = Path(bundle), plain, backbone, info
        self.runtime, self.device = None, "cpu"

    def __call__(self):
        import selfxit
        ee = selfxit.load(self.bundle, self.backbone)
        if self.plain:
            ee.thresholds = {}
        if self.device != "cpu":
            ee.to(self.device)
        if self.runtime is not None:
            ee.runtime = self.runtime  # plain too: the backbone baseline runs bucketed the same way
        return ee


def now() -> str:
    """UTC now, to the second, for /healthz."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (3.10)


class Served:
    """The model being served and what /healthz says about it (replaced whole on reload)."""

    def __init__(self, ee, generation: int, path: Path | None, manifest_sha256: str | None):
        self.ee, self.generation = ee, generation
        self.exit_names = list(ee.thresholds)  # exit position -> layer name
        self.version = ee.provenance.version or manifest_sha256  # recorded with logged traffic
        self.describe = {"path": str(path) if path else None, "generation": generation,
                         "exits": [{"layer": n, "threshold": t} for n, t in ee.thresholds.items()],
                         "tolerance": ee.tolerance, "manifest_sha256": manifest_sha256,
                         "loaded_at": now()}


def signature(bundle: Path | None):
    """What the watcher compares: inode, mtime and size of the manifest and heads files."""
    if bundle is None:
        return None
    try:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (os.stat(bundle / f) for f in (MANIFEST, WEIGHTS)))
    except OSError:
        return None


def manifest_sha256(bundle: Path | None) -> str | None:
    """A short digest of the manifest: the served version when the bundle records none."""
    try:
        return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()[:16] if bundle else None
    except OSError:
        return None


def check_compatible(new, old) -> None:
    """Refuse a bundle the running server cannot switch to (other input, classes or backbone)."""
    if tuple(new.input_shape) != tuple(old.input_shape) or new.num_classes != old.num_classes:
        raise ValueError(f"bundle takes input {list(new.input_shape)} with {new.num_classes} classes; the server "
                         f"serves {list(old.input_shape)} with {old.num_classes}")
    modules = dict(new.backbone.named_modules())
    missing = [name for name in new.thresholds if name not in modules]
    if missing:
        raise ValueError(f"exit layers {missing} are not modules of the backbone")


class Reloader:
    """The served bundle and its reloads; the first bundle is loaded in the constructor (errors raise there)."""

    def __init__(self, loader: Callable[[], Any], bundle: Path | None, on_reload: Callable[[bool], None],
                 prepare: Callable[[Any], None] | None = None):
        # prepare(ee) runs on each loaded model before it serves (off the event loop): a warm-up; errors refuse it
        self._loader, self.bundle, self._on_reload, self._prepare = loader, bundle, on_reload, prepare
        self.seen = signature(bundle)
        self.served = Served(self._load(), 1, bundle, manifest_sha256(bundle))
        self.last_reload: dict | None = None
        self._lock = asyncio.Lock()

    def _load(self):
        ee = self._loader()
        if self._prepare is not None:
            self._prepare(ee)
        return ee

    @property
    def degraded(self) -> bool:
        """True while the last reload was refused (the old bundle keeps serving)."""
        return bool(self.last_reload and not self.last_reload["ok"])

    async def reload(self, reason: str) -> dict:
        """Load the bundle folder now and switch to it; ApiError(409) when it is refused."""
        async with self._lock:
            seen = signature(self.bundle)
            sha = manifest_sha256(self.bundle)
            old = self.served
            try:
                ee = await asyncio.to_thread(self._load)
                check_compatible(ee, old.ee)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                self.last_reload = {"ok": False, "reason": reason, "at": now(), "error": message}
                self.seen = seen
                self._on_reload(False)
                log.error("bundle refused (%s), still serving generation %d: %s", reason, old.generation, message)
                raise ApiError(409, f"bundle refused, still serving generation {old.generation}: {message}") from exc
            self.served = Served(ee, old.generation + 1, self.bundle, sha)  # atomic switch
            self.last_reload = {"ok": True, "reason": reason, "at": now(), "error": None}
            self.seen = seen
            self._on_reload(True)
            log.warning("bundle reloaded (%s): generation %d", reason, old.generation + 1)
            return self.served.describe

    async def watch(self, poll_s: float) -> None:
        """Reload when the bundle's files changed and then held still for one more poll (copy finished)."""
        candidate = None
        while True:
            await asyncio.sleep(poll_s)
            sig = signature(self.bundle)
            if sig is None or sig == self.seen:
                candidate = None
            elif sig != candidate:
                candidate = sig  # wait one more poll, so a bundle being copied in has settled
            else:
                candidate = None
                try:
                    await self.reload("bundle folder changed")
                except ApiError:
                    pass  # refused: logged and shown in /healthz
                except Exception:
                    log.exception("reload failed unexpectedly; still watching")
