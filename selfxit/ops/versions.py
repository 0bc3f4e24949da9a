"""A folder of published bundle versions with an atomically switched ``current`` pointer.

Layout::

    BUNDLES/
      versions/v000001/        one complete bundle per version (manifest.json + heads.safetensors)
      versions/v000002/
      current -> versions/v000002   a symlink, replaced in one rename: readers see the old or the new
      history.jsonl            one line per publish / rollback, with the reason

Serve ``BUNDLES/current``: the server's bundle watcher follows the symlink, so a publish or a
rollback is picked up like any other bundle change. A version is copied into a hidden staging
folder and renamed into ``versions/`` only when complete (:func:`selfxit.core.atomic.staged_dir`),
and ``current`` moves only after that, so a publisher killed at any moment leaves the published
bundle untouched; what such a publisher left behind is removed by the next publish. Publishers take
a file lock.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from selfxit.core.atomic import fsync_dir, remove_stale_temporaries, staged_dir, temporary_name
from selfxit.core.bundle import MANIFEST, BundleError, load_bundle

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"


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
        """Publish and rollback events, oldest first."""
        try:
            lines = (self.root / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    # ---- writing --------------------------------------------------------------------------------
    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def publish(self, bundle_dir: str | Path, reason: str = "") -> str:
        """Copy a complete bundle folder in as the next version and make it current; returns its name."""
        bundle_dir = Path(bundle_dir)
        manifest, _ = load_bundle(bundle_dir)  # refuse anything that is not a readable bundle
        with self._lock():
            folder = self.root / VERSIONS
            folder.mkdir(parents=True, exist_ok=True)
            numbers = [int(v.name[1:]) for v in self.versions() if v.name[1:].isdigit()]
            name = f"v{max(numbers, default=0) + 1:06d}"
            with staged_dir(folder / name) as staging:  # fsync'ed and renamed into place only when complete
                for f in bundle_dir.iterdir():
                    if f.is_file():
                        shutil.copy2(f, staging / f.name)
                section = "provenance" if "provenance" in manifest else "meta"  # format 1 bundles keep 'meta'
                manifest.setdefault(section, {})["version"] = name
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            self._point_to(name)
            self._log({"event": "publish", "version": name, "reason": reason})
            self._prune()
        return name

    def rollback(self, reason: str = "") -> str:
        """Make the version before the current one current again; returns its name."""
        with self._lock():
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
        """Keep the newest ``keep`` versions (and always the current one); drop what publishers that died
        on this host left behind (staging folders, a ``current`` link not yet renamed)."""
        versions = self.versions()
        current = self.current()
        for v in versions[:-self.keep]:
            if v.name != current:
                shutil.rmtree(v.path, ignore_errors=True)
        remove_stale_temporaries(self.root / VERSIONS)
        remove_stale_temporaries(self.root)
