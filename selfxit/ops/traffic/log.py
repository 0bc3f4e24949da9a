""":class:`TrafficLog`: one object that writes, reads and prunes a traffic log location.

The writing, reading and retention halves live in :mod:`.writer`, :mod:`.reader` and
:mod:`.retention`; this module only validates the settings and resolves the location.
"""
from __future__ import annotations

import os
import threading

from selfxit.ops.traffic.layout import check_positive
from selfxit.ops.traffic.reader import TrafficReader
from selfxit.ops.traffic.retention import TrafficRetention
from selfxit.ops.traffic.writer import TrafficWriter


class TrafficLog(TrafficWriter, TrafficReader, TrafficRetention):
    """Append-only traffic log at ``location`` (a folder, or an fsspec URL); reading sees every writer's records.

    ``append`` buffers; the buffer is flushed (made durable) once it holds ``flush_records`` records
    or its oldest record waited ``flush_interval_s`` (a background thread flushes an idle buffer; None
    turns the thread off). Shards rotate at ``shard_bytes`` or after ``shard_max_age_s``.
    Read-only use needs no writes: a writer's first shard is created by its first flush. Opening a
    local log removes what writers that died on this host left behind (``removed`` lists it; see
    ``remove_litter``), never a live writer's files.
    """

    def __init__(self, location: str | os.PathLike, *, flush_records: int = 64, flush_interval_s: float | None = 1.0,
                 shard_bytes: int = 64 << 20, storage_options: dict | None = None,
                 shard_max_age_s: float = 3600.0, max_pending: int | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(location, (str, os.PathLike)):
            raise TypeError(f"location must be a path or an fsspec URL; got {type(location).__name__}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict or None; got {type(storage_options).__name__}")
        self.flush_records = check_positive("flush_records", flush_records, integer=True)
        self.flush_interval_s = check_positive("flush_interval_s", flush_interval_s, allow_none=True)
        self.shard_bytes = check_positive("shard_bytes", shard_bytes, integer=True)
        self.shard_max_age_s = check_positive("shard_max_age_s", shard_max_age_s)
        self.max_pending = check_positive("max_pending", max_pending if max_pending is not None
                                          else 64 * flush_records, integer=True)
        self.location = os.fspath(location)
        self.fs, self.root = fsspec.core.url_to_fs(self.location, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = os.path.abspath(self.root)
        self._buf_lock = threading.Lock()
        self._io_lock = threading.RLock()
        self._closed = False
        self._start_writer()
        self.removed: list[str] = self.remove_litter()  # what dead writers on this host left behind
