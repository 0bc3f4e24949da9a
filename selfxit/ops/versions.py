"""A folder of published bundle versions with an atomically switched ``current`` pointer.

Layout::

    BUNDLES/
      versions/v000001/        one complete bundle per version (manifest.json + heads.safetensors)
      versions/v000002/
      current -> versions/v000002   a symlink, replaced in one rename: readers see the old or the new
      history.jsonl            one line per publish / rollback, with the reason
      .work/selfxit-<host>-<pid>-...   working folders of retrain runs (see selfxit.ops.retrain)

Serve ``BUNDLES/current``: the server's bundle watcher follows the symlink, so a publish or a
rollback is picked up like any other bundle change. A version is copied into a hidden staging
folder and renamed into ``versions/`` only when complete (:func:`selfxit.core.atomic.staged_dir`),
and ``current`` moves only after that, so a publisher killed at any moment leaves the published
bundle untouched. A publisher also leaves a marker naming the version it is publishing
(``.publishing-v000003.tmp-<host>-<pid>-...``); :meth:`BundleStore.clean` (run by every publish and
rollback, and by retrain at its start) uses the markers of dead publishers to remove a version that
was copied in but never made current, logs a publish that was made current but not logged, and
removes the staging folders and temporary links that dead publishers on this host left behind.
Publishers take a file lock.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from selfxit.core.atomic import (
    TMP_MARK,
    fsync_dir,
    remove_stale_temporaries,
    staged_dir,
    stale_temporaries,
    temporary_name,
)
from selfxit.core.bundle import MANIFEST, BundleError, load_bundle

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"
PUBLISHING = "publishing-"  # marker: .publishing-<version>.tmp-<host>-<pid>-<random>
log = logging.getLogger("selfxit.ops.versions")


@dataclass
class VersionInfo:
    """One published version."""

    name: str  # e.g. "v000003"
    path: Path
    created: str | None
    current: bool


class BundleStore:
    """Published bundle versions under ``root``, the last ``keep`` of them kept."""

    def __init__(self, root: str | Path, keep: int = 5):
        if keep < 2:
            raise ValueError(f"keep must be >= 2 so that rollback has a version to go back to; got {keep}")
        self.root = Path(root)
        self.keep = keep

    # ---- reading --------------------------------------------------------------------------------
    @property
    def current_path(self) -> Path:
        """The path to serve (``root/current``); it resolves to the current version."""
        return self.root / CURRENT

    def current(self) -> str | None:
        """Name of the current version, or None when nothing is published yet."""
        link = self.root / CURRENT
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    def versions(self) -> list[VersionInfo]:
        """Published versions, oldest first."""
        folder = self.root / VERSIONS
        if not folder.is_dir():
            return []
        current = self.current()
        out = []
        for path in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("v")):
            try:
                created = json.loads((path / MANIFEST).read_text()).get("created")
            except (OSError, json.JSONDecodeError):
                created = None
            out.append(VersionInfo(path.name, path, created, path.name == current))
        return out

    def history(self) -> list[dict]:
        """Publish and rollback events, oldest first (a line torn by a crash is skipped with a warning)."""
        try:
            lines = (self.root / HISTORY).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for number, line in enumerate(lines, 1):
            try:
                event = json.loads(line) if line.strip() else None
            except ValueError:
                event = None
                warnings.warn(f"{self.root / HISTORY}: line {number} is not a JSON event (torn by a crash?); "
                              "skipped", stacklevel=2)
            if isinstance(event, dict):
                events.append(event)
        return events

    # ---- writing --------------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def clean(self) -> list[Path]:
        """Settle what publishers that died on this host left behind, under the publish lock; returns the
        paths removed. A version copied in but never made current is removed; one made current but not
        logged gets its history line; staging folders and temporary links go. Files of a live publisher,
        or of another host, are never touched. Publish and rollback run it first; retrain at its start."""
        if not self.root.is_dir():
            return []
        with self._lock():
            return self._clean()

    def _clean(self) -> list[Path]:
        removed: list[Path] = []
        for marker in stale_temporaries(self.root):
            if marker.name.startswith("." + PUBLISHING):
                removed += self._settle(marker.name[1 + len(PUBLISHING):].split(TMP_MARK)[0])
                marker.unlink(missing_ok=True)
                removed.append(marker)
        removed += remove_stale_temporaries(self.root / VERSIONS) + remove_stale_temporaries(self.root)
        if removed:
            log.info("bundle store %s: removed %d item(s) left by publishers that died: %s", self.root, len(removed),
                     ", ".join(p.name for p in removed[:10]))
        return removed

    def _settle(self, name: str) -> list[Path]:
        """After a publish of version ``name`` stopped (an error, a signal, or a dead publisher): keep it if it
        became current (logging the publish if that line is missing), otherwise remove it."""
        path = self.root / VERSIONS / name
        if not re.fullmatch(r"v\d+", name) or not (path.exists() or path.is_symlink()):
            return []
        if self.current() == name:
            if not any(e.get("event") == "publish" and e.get("version") == name for e in self.history()):
                self._log({"event": "publish", "version": name,
                           "reason": "recovered: the publisher stopped after making it current, before logging"})
            return []
        self._discard(path)
        return [path]

    @staticmethod
    def _discard(path: Path) -> None:
        """Remove a version folder: renamed out of the listing first, so a removal cut short leaves only a
        hidden temporary (cleaned up later), never a half-deleted version that rollback could pick."""
        doomed = temporary_name(path)
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
        shutil.rmtree(doomed, ignore_errors=True)

    def publish(self, bundle_dir: str | Path, reason: str = "") -> str:
        """Copy a complete bundle folder in as the next version and make it current; returns its name.

        Stopped at any point (an error, SIGTERM through a handler that raises, or SIGKILL and the next
        :meth:`clean`), the new version is either current and logged, or gone."""
        bundle_dir = Path(bundle_dir)
        manifest, _ = load_bundle(bundle_dir)  # refuse anything that is not a readable bundle
        with self._lock():
            self._clean()
            folder = self.root / VERSIONS
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(v.name[1:]) for v in self.versions() if v.name[1:].isdigit()]
            name = f"v{max(numbers, default=0) + 1:06d}"
            marker = temporary_name(self.root / f"{PUBLISHING}{name}")
            marker.touch()
            try:
                with staged_dir(folder / name) as staging:  # fsync'ed and renamed into place only when complete
                    for f in bundle_dir.iterdir():
                        if f.is_file():
                            shutil.copy2(f, staging / f.name)
                    section = "provenance" if "provenance" in manifest else "meta"  # format 1 bundles keep 'meta'
                    manifest.setdefault(section, {})["version"] = name
                    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
                self._point_to(name)
                self._log({"event": "publish", "version": name, "reason": reason})
            finally:
                self._settle(name)  # a no-op when it went through; else keeps or removes the version
                marker.unlink(missing_ok=True)
            self._prune()
        return name

    def rollback(self, reason: str = "") -> str:
        """Make the version before the current one current again; returns its name."""
        with self._lock():
            self._clean()
            names = [v.name for v in self.versions()]
            current = self.current()
            if current not in names:
                raise BundleError(f"{self.root}: nothing is published yet, so there is nothing to roll back")
            position = names.index(current)
            if position == 0:
                raise BundleError(f"{self.root}: {current} is the oldest version kept; there is no earlier one")
            previous = names[position - 1]
            self._point_to(previous)
            self._log({"event": "rollback", "version": previous, "from": current, "reason": reason})
        return previous

    def _point_to(self, name: str) -> None:
        """Switch ``current`` to version ``name`` in one rename: a reader sees the old or the new link."""
        tmp = temporary_name(self.root / CURRENT)
        os.symlink(Path(VERSIONS) / name, tmp)
        try:
            os.replace(tmp, self.root / CURRENT)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def _log(self, event: dict) -> None:
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}
        with open(self.root / HISTORY, "a") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _prune(self) -> None:
        """Keep the newest ``keep`` versions (and always the current one)."""
        versions = self.versions()
        current = self.current()
        for v in versions[:-self.keep]:
            if v.name != current:
                self._discard(v.path)
