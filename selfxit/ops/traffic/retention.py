"""Retention for :class:`~selfxit.ops.traffic.TrafficLog`: delete whole shards by age or total size.

Only whole shards go (a shard is never rewritten, so a reader never sees one half-pruned), and never
one a live writer still appends to. What crashed writers left behind (:meth:`TrafficRetention.remove_litter`:
index files half-written under a temporary name, empty shards, indexes whose shard is gone) is
removed when a log is opened and on every prune; a live writer's files are never touched.
"""
from __future__ import annotations

import logging
import math
import os
import time

from selfxit.core.atomic import remove_stale_temporaries
from selfxit.ops.traffic.layout import (
    INDEX_SUFFIX,
    SHARD_SUFFIX,
    ShardInfo,
    check_positive,
    dead_writer,
    held_live,
    index_path,
    log_error,
)

log = logging.getLogger("selfxit.ops.traffic")


class TrafficRetention:
    """Mixin: ``prune`` of a TrafficLog (uses the reader's ``_list``, ``_summary`` and ``_is_live``)."""

    def prune(self, max_age_s: float | None = None, max_bytes: int | None = None) -> int:
        """Delete whole shards whose newest record is older than ``max_age_s``, then the oldest shards until
        the log is at most ``max_bytes``. Shards a live writer still appends to are never deleted.
        Returns the number of records removed."""
        if max_age_s is None and max_bytes is None:
            raise ValueError("prune needs max_age_s and/or max_bytes")
        check_positive("max_age_s", max_age_s, allow_none=True, allow_zero=True)
        check_positive("max_bytes", max_bytes, allow_none=True, integer=True, allow_zero=True)
        shards = self._list()
        removable = [s for s in shards if not self._is_live(s)]
        doomed: dict[str, ShardInfo] = {}
        if max_age_s is not None:
            cutoff = time.time() - max_age_s
            for s in removable:
                index = self._summary(s)
                if not index["records"] or index["newest"] < cutoff:
                    doomed[s.path] = s
        if max_bytes is not None:
            total = sum(s.size for s in shards if s.path not in doomed)
            oldest_first = sorted((s for s in removable if s.path not in doomed),
                                  key=lambda s: (self._summary(s)["newest"] or -math.inf, s.name))
            for s in oldest_first:
                if total <= max_bytes:
                    break
                doomed[s.path] = s
                total -= s.size
        removed = 0
        for s in doomed.values():
            if self._delete(s):
                removed += self._summary(s)["records"]
        self.remove_litter()
        return removed

    def _delete(self, shard: ShardInfo) -> bool:
        index = index_path(shard.path)
        try:
            if self.local:
                os.remove(shard.path)
                try:
                    os.remove(index)
                except FileNotFoundError:
                    pass
            else:
                self.fs.rm_file(shard.path)
                if self.fs.exists(index):
                    self.fs.rm_file(index)
        except FileNotFoundError:
            return False  # another pruner got there first
        except OSError as e:
            raise log_error(e.errno, f"cannot delete traffic log shard {shard.path}: {e.strerror or e}") from e
        return True

    def remove_litter(self) -> list[str]:
        """Remove what writers that died on this host left in a local log, and return the paths removed:
        index temporaries (``.<shard>.idx.tmp-<host>-<pid>-...``) of writers killed while sealing, empty
        shards of writers killed before their first write, and indexes whose shard is gone (a prune
        interrupted between its two deletions). A file whose writer still runs, or that belongs to
        another host, is never touched; a location this process cannot write is left as it is.
        Runs when the log is opened and after every prune.
        """
        if not self.local:
            return []  # object stores: every object is written whole, nothing is left half-done
        try:
            names = set(os.listdir(self.root))
        except OSError:
            return []
        removed = [str(p) for p in remove_stale_temporaries(self.root)]
        for name in sorted(names):
            path = os.path.join(self.root, name)
            if name.endswith(INDEX_SUFFIX) and name[:-len(INDEX_SUFFIX)] + SHARD_SUFFIX not in names:
                doomed = True
            elif name.endswith(SHARD_SUFFIX) and dead_writer(name) and index_path(name) not in names:
                try:
                    doomed = os.path.getsize(path) == 0 and not held_live(path)
                except OSError:
                    doomed = False
            else:
                doomed = False
            if doomed:
                try:
                    os.remove(path)
                except OSError:
                    continue
                removed.append(path)
        if removed:
            log.info("traffic log %s: removed %d file(s) left by writers that died: %s", self.location,
                     len(removed), ", ".join(os.path.basename(p) for p in removed[:10]))
        return removed
