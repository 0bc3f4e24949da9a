"""The writing half of :class:`~selfxit.ops.traffic.TrafficLog`: buffering, shards, flush, seal.

Local folders: a writer appends to its own open shard, ``flush()`` returns once the records are
fsync'ed, and the writer holds an ``flock`` on the shard while it is open. A write error truncates
the shard back to its last acknowledged record, so ``kill -9`` or a full disk loses only records
that ``flush()`` had not acknowledged. Object stores cannot append: every flush writes one immutable
shard object (and its index). A sealed shard's index is written through :mod:`selfxit.core.atomic`,
so readers see a complete index or none (and then scan the shard).
"""
from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import posixpath
import secrets
import threading
import time
import warnings
import weakref
from datetime import datetime, timezone
from typing import Iterator

from selfxit.core.atomic import fsync_dir, write_bytes
from selfxit.ops.traffic.codec import TrafficLogError, TrafficRecord, encode_record
from selfxit.ops.traffic.layout import SHARD_SUFFIX, OpenShard, Summary, hold_live, host, index_path, log_error


class TrafficWriter:
    """Mixin: the writer state and API of a TrafficLog (``location``, ``fs``, ``root``, ``local`` and the
    flush settings are set by ``TrafficLog.__init__``)."""

    # ---- writer state -------------------------------------------------------------------------------
    def _start_writer(self) -> None:
        """(Re)initialise this process's writer identity; also run in a forked child."""
        self._pid = os.getpid()
        self._writer_id = f"{host()}-{self._pid}-{secrets.token_hex(4)}"
        self._seq = 0
        self._buffer: list[tuple[float, bytes]] = []
        self._buffer_since = 0.0
        self._acked = 0
        self._dropped = 0
        self._shard: OpenShard | None = None
        self._background_error: BaseException | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._atexit = None

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: never append to the parent's shard or resend its buffer
            if self._shard is not None:
                os.close(self._shard.fd)  # the parent's lock stays held through its own descriptor
            self._buf_lock = threading.Lock()
            self._io_lock = threading.RLock()
            self._start_writer()

    def _ensure_timer(self) -> None:
        if self._atexit is None:
            ref = weakref.ref(self)
            self._atexit = functools.partial(_flush_at_exit, ref)
            atexit.register(self._atexit)
        if self.flush_interval_s is None or (self._timer is not None and self._timer.is_alive()):
            return
        self._timer = threading.Thread(target=_timer_loop, args=(weakref.ref(self), self._stop, self.flush_interval_s),
                                       name="selfxit-traffic-flush", daemon=True)
        self._timer.start()

    def _new_shard_name(self) -> str:
        self._seq += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        return f"{stamp}-{self._writer_id}-{self._seq:05d}{SHARD_SUFFIX}"

    # ---- public writer API --------------------------------------------------------------------------
    def append(self, record: TrafficRecord) -> None:
        """Buffer one record (validated and encoded now); flushes when the buffer is full or old enough.

        Raises TrafficLogError when that flush cannot write (the records stay buffered, up to
        ``max_pending``; beyond it the oldest are dropped and counted in ``stats()["dropped"]``), so a
        server can switch logging off and keep serving.
        """
        if self._closed:
            raise ValueError(f"the traffic log {self.location} is closed")
        self._check_fork()
        frame = encode_record(record)
        with self._buf_lock:
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append((float(record.timestamp), frame))
            self._trim()
            due = len(self._buffer) >= self.flush_records or (
                self.flush_interval_s is not None and time.monotonic() - self._buffer_since >= self.flush_interval_s)
        self._ensure_timer()
        error, self._background_error = self._background_error, None
        if due:
            self.flush()
        elif error is not None:
            raise error

    def _trim(self) -> None:
        extra = len(self._buffer) - self.max_pending
        if extra > 0:
            del self._buffer[:extra]
            self._dropped += extra

    def flush(self) -> int:
        """Make every buffered record durable (fsync, or one stored object); returns how many records
        this writer has had acknowledged in total, the promise that survives ``kill -9``.
        Raises TrafficLogError when it cannot write."""
        self._check_fork()
        with self._io_lock:
            with self._buf_lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return self._acked
            written = 0
            try:
                for chunk in self._chunks(batch):
                    (self._write_local if self.local else self._write_object)(chunk)
                    written += len(chunk)
                    self._acked += len(chunk)
            except TrafficLogError:
                with self._buf_lock:
                    if not self._buffer:
                        self._buffer_since = time.monotonic()
                    self._buffer[:0] = batch[written:]
                    self._trim()
                raise
            return self._acked

    def _chunks(self, batch: list[tuple[float, bytes]]) -> Iterator[list[tuple[float, bytes]]]:
        """Consecutive runs of frames that fit a shard (at least one frame each)."""
        room = self.shard_bytes - (self._shard.size if self.local and self._shard else 0)
        chunk: list[tuple[float, bytes]] = []
        size = 0
        for item in batch:
            if chunk and size + len(item[1]) > room:
                yield chunk
                chunk, size, room = [], 0, self.shard_bytes
            chunk.append(item)
            size += len(item[1])
        if chunk:
            yield chunk

    def _write_local(self, chunk: list[tuple[float, bytes]]) -> None:
        data = b"".join(frame for _, frame in chunk)
        shard = self._shard
        if shard is not None and (shard.size + len(data) > self.shard_bytes and shard.size > 0
                                  or time.monotonic() - shard.opened >= self.shard_max_age_s):
            self._seal()
            shard = None
        if shard is None:
            shard = self._shard = self._open_local_shard()
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(shard.fd, view[written:])
            os.fsync(shard.fd)
        except OSError as e:
            restored = self._truncate(shard)
            self._seal(write_index=restored)
            state = ("it was truncated back to its last acknowledged record" if restored
                     else "its torn tail will be skipped by readers")
            full = " (disk full or file size limit)" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
            raise log_error(
                e.errno, f"cannot write {len(chunk)} traffic record(s) ({len(data)} bytes) to shard {shard.path}: "
                f"{e.strerror or e}{full}; "
                f"{state}, earlier records and shards are intact; the records stay buffered and are retried "
                "on the next flush") from e
        shard.size += len(data)
        for t, _ in chunk:
            shard.summary.add(t)

    @staticmethod
    def _truncate(shard: OpenShard) -> bool:
        try:
            os.ftruncate(shard.fd, shard.size)
            os.fsync(shard.fd)
            return True
        except OSError:
            return False

    def _open_local_shard(self) -> OpenShard:
        path = os.path.join(self.root, self._new_shard_name())
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as e:
            raise log_error(e.errno, f"cannot create a traffic log shard {path}: {e.strerror or e}") from e
        hold_live(fd)
        fsync_dir(self.root)
        return OpenShard(path, fd, time.monotonic())

    def _seal(self, write_index: bool = True) -> None:
        """Write the open shard's index and close it (releasing its lock); it is never appended again."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        try:
            if shard.size == 0:  # nothing was ever acknowledged here
                _remove_quietly(shard.path)
            elif write_index:
                try:
                    write_bytes(index_path(shard.path), json.dumps(shard.summary.to_index(shard.size)).encode())
                except OSError as e:
                    warnings.warn(f"traffic log: cannot write the index of {shard.path} ({e.strerror or e}); "
                                  "its records are intact and readers scan it instead", stacklevel=3)
        finally:
            os.close(shard.fd)

    def _write_object(self, chunk: list[tuple[float, bytes]]) -> None:
        data = b"".join(frame for _, frame in chunk)
        name = self._new_shard_name()
        path = posixpath.join(self.root, name)
        summary = Summary()
        for t, _ in chunk:
            summary.add(t)
        try:
            self.fs.pipe_file(path, data)  # one PUT: an object store shows the whole object or none
        except Exception as e:
            raise log_error(getattr(e, "errno", None),
                            f"cannot store {len(chunk)} traffic record(s) ({len(data)} bytes) as {self.location}/"
                            f"{name}: {e}; the records stay buffered and are retried on the next flush") from e
        try:
            self.fs.pipe_file(index_path(path), json.dumps(summary.to_index(len(data))).encode())
        except Exception as e:
            warnings.warn(f"traffic log: stored {path} but not its index ({e}); readers scan it instead", stacklevel=3)

    def close(self) -> None:
        """Flush, seal the open shard and stop the flush thread (idempotent), so the shard gets its index
        and retention may delete it."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._stop.set()
            with self._io_lock:
                if self._shard is not None and os.getpid() == self._pid:
                    self._seal()
            if self._atexit is not None:
                atexit.unregister(self._atexit)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _timer_loop(ref, stop: threading.Event, interval: float) -> None:
    """Flush an idle buffer once its oldest record has waited ``interval``; exits when the log is closed or gone."""
    while not stop.wait(max(0.01, interval / 4)):
        log = ref()
        if log is None:
            return
        try:
            with log._buf_lock:
                due = bool(log._buffer) and time.monotonic() - log._buffer_since >= interval
            if due:
                log.flush()
            elif log._shard is not None and time.monotonic() - log._shard.opened >= log.shard_max_age_s:
                with log._io_lock:
                    if log._shard is not None and os.getpid() == log._pid:
                        log._seal()
        except Exception as e:  # reported by the next append
            log._background_error = e
        del log


def _flush_at_exit(ref) -> None:
    log = ref()
    if log is not None and not log._closed:
        try:
            log.close()
        except Exception as e:  # noqa: BLE001 - interpreter exit: report, do not raise
            warnings.warn(f"traffic log {log.location}: could not flush at exit: {e}", stacklevel=2)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
