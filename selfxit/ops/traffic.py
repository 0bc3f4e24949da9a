"""The traffic log: append-only shards of CRC-framed records, safe under crashes and many writers.

Layout of a log location (a local folder, or any fsspec URL such as ``memory://`` or ``s3://``)::

    <start>-<host>-<pid>-<random>-<seq>.tlog   a shard: records appended by ONE writer, never by two
    <same name>.idx                            its index (JSON: records, bytes, oldest, newest, sorted),
                                               written once the shard is sealed and never appended again

Each record is one frame: ``b"SXTR"``, header length, body length (uint32 little-endian), CRC-32 of
lengths + header + body, then a JSON header (timestamp, exit, prediction, tensor dtypes and shapes, ...)
and a body holding the tensors' raw bytes followed by the encoded image bytes. No pickle.

Local folders: a writer appends to its open shard, ``flush()`` fsyncs, and the writer holds an
``flock`` on the shard while it is open, so ``prune`` never removes a shard a live writer appends to
(a killed writer's lock goes with its process). A write error truncates the shard back to its last
acknowledged record. Object stores cannot append: every flush writes one immutable shard object.
Readers check every frame; a torn or corrupt stretch is skipped with a warning naming the shard, and
reading resumes at the next intact frame.
"""
from __future__ import annotations

import atexit
import errno
import functools
import io
import json
import math
import os
import posixpath
import re
import secrets
import socket
import struct
import threading
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from heapq import heappop, heappush
from typing import Iterator

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: open shards are then never pruned
    fcntl = None

SOURCES = ("serve", "collect")
SHARD_SUFFIX = ".tlog"
INDEX_SUFFIX = ".idx"
MAGIC = b"SXTR"
_PREFIX = struct.Struct("<4sIII")  # magic, header length, body length, crc32(lengths + header + body)
_LENGTHS = struct.Struct("<II")
_MAX_HEADER = 1 << 20
_MAX_BODY = 1 << 30
FORMAT_VERSION = 1


@dataclass
class TrafficRecord:
    """One request item as logged: what arrived, what the backbone said, which exit answered."""

    timestamp: float  # unix seconds
    input: torch.Tensor | None = None  # the model input, e.g. float [3, 32, 32], when a tensor arrived
    encoded: bytes | None = None  # or the encoded image bytes (JPEG/PNG) when that is what arrived
    content_type: str | None = None  # e.g. "image/jpeg"
    backbone_probs: np.ndarray | None = None  # [classes] float32 softmax of the backbone, when computed
    exit: str | None = None  # exit layer name taken, or "final"
    prediction: int | None = None
    bundle_version: str | None = None
    shadow: bool = False  # this request also ran the full backbone for monitoring
    source: str = "serve"  # "serve" or "collect"
    meta: dict | None = None  # small JSON-serialisable extras, e.g. {"file": "cat/0001.jpg"} from collect


class TrafficLogError(OSError):
    """The traffic log cannot be written (disk full, permission, ...); the message says what and where."""


# ---- record encoding ---------------------------------------------------------------------------------
def _check_record(r: TrafficRecord) -> None:
    if not isinstance(r, TrafficRecord):
        raise TypeError(f"expected a TrafficRecord; got {type(r).__name__}")
    if isinstance(r.timestamp, bool) or not isinstance(r.timestamp, (int, float, np.floating, np.integer)) \
            or not math.isfinite(r.timestamp):
        raise ValueError(f"TrafficRecord.timestamp must be a finite number of unix seconds; got {r.timestamp!r}")
    if r.input is not None and not isinstance(r.input, torch.Tensor):
        raise TypeError(f"TrafficRecord.input must be a torch.Tensor or None; got {type(r.input).__name__}")
    if r.encoded is not None and not isinstance(r.encoded, (bytes, bytearray, memoryview)):
        raise TypeError(f"TrafficRecord.encoded must be bytes or None; got {type(r.encoded).__name__}")
    for name in ("content_type", "exit", "bundle_version"):
        value = getattr(r, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"TrafficRecord.{name} must be a str or None; got {type(value).__name__}")
    if r.prediction is not None and (isinstance(r.prediction, bool)
                                     or not isinstance(r.prediction, (int, np.integer))):
        raise TypeError(f"TrafficRecord.prediction must be an int or None; got {r.prediction!r}")
    if not isinstance(r.shadow, (bool, np.bool_)):
        raise TypeError(f"TrafficRecord.shadow must be a bool; got {r.shadow!r}")
    if r.source not in SOURCES:
        raise ValueError(f"TrafficRecord.source must be one of {', '.join(SOURCES)}; got {r.source!r}")
    if r.meta is not None and not isinstance(r.meta, dict):
        raise TypeError(f"TrafficRecord.meta must be a dict or None; got {type(r.meta).__name__}")


def _tensor_bytes(t: torch.Tensor | np.ndarray) -> tuple[dict, bytes]:
    if isinstance(t, np.ndarray):  # float32 probabilities: no torch round trip (it costs tens of microseconds)
        data = t.tobytes()
        return {"dtype": str(t.dtype), "shape": list(t.shape), "nbytes": len(data)}, data
    t = t.detach().cpu()
    try:
        data = t.numpy().tobytes()  # C order, whatever the strides
    except TypeError:  # no numpy dtype (e.g. bfloat16): the raw bytes of a contiguous copy
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "nbytes": len(data)}, data


def _tensor_from(spec: dict, data: bytes) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {spec['dtype']!r} in a traffic record")
    if not data:
        return torch.empty(spec["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(spec["shape"])


def encode_record(record: TrafficRecord) -> bytes:
    """One record as a self-checking frame: magic, lengths, CRC-32, JSON header, body.

    The body holds the tensors' raw (little-endian) bytes, their dtype and shape in the header, then the
    encoded image bytes.
    """
    _check_record(record)
    tensors, parts = {}, []
    if record.input is not None:
        tensors["input"], data = _tensor_bytes(record.input)
        parts.append(data)
    if record.backbone_probs is not None:
        probs = np.asarray(record.backbone_probs, dtype=np.float32)
        if probs.ndim != 1:
            raise ValueError(f"TrafficRecord.backbone_probs must be 1-D [classes]; got shape {probs.shape}")
        tensors["backbone_probs"], data = _tensor_bytes(probs)
        parts.append(data)
    if record.encoded is not None:
        parts.append(bytes(record.encoded))
    head = {"v": FORMAT_VERSION, "t": float(record.timestamp), "content_type": record.content_type,
            "exit": record.exit, "prediction": None if record.prediction is None else int(record.prediction),
            "bundle_version": record.bundle_version, "shadow": bool(record.shadow), "source": record.source,
            "meta": record.meta, "tensors": tensors,
            "encoded": None if record.encoded is None else len(parts[-1])}
    try:
        header = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"TrafficRecord.meta must be JSON-serialisable: {e}") from e
    body = b"".join(parts)
    lengths = _LENGTHS.pack(len(header), len(body))
    crc = zlib.crc32(body, zlib.crc32(header, zlib.crc32(lengths)))
    return _PREFIX.pack(MAGIC, len(header), len(body), crc) + header + body


def decode_record(header: bytes | dict, body: bytes) -> TrafficRecord:
    """A record from a frame's JSON header (bytes or parsed) and body."""
    head = json.loads(header) if isinstance(header, (bytes, bytearray)) else header
    tensors, pos = {}, 0
    for name in ("input", "backbone_probs"):  # the order encode_record writes them in
        spec = head["tensors"].get(name)
        if spec is not None:
            tensors[name] = _tensor_from(spec, body[pos:pos + spec["nbytes"]])
            pos += spec["nbytes"]
    probs = tensors.get("backbone_probs")
    return TrafficRecord(
        timestamp=head["t"], input=tensors.get("input"),
        encoded=None if head["encoded"] is None else bytes(body[pos:pos + head["encoded"]]),
        content_type=head["content_type"], backbone_probs=None if probs is None else probs.numpy(),
        exit=head["exit"], prediction=head["prediction"], bundle_version=head["bundle_version"],
        shadow=head["shadow"], source=head["source"], meta=head["meta"])


def decode_frame(frame: bytes) -> TrafficRecord:
    """The record in one frame from ``encode_record``; ValueError if it is torn or corrupt."""
    gaps: list = []
    found = list(_frames(io.BytesIO(frame), len(frame), gaps))
    if gaps or len(found) != 1:
        raise ValueError(f"not one intact traffic record frame ({len(frame)} bytes; {len(found)} intact frame(s), "
                         f"{sum(n for _, n in gaps)} unreadable byte(s))")
    _, head, body = found[0]
    return decode_record(head, body)


def _frames(f, size: int, gaps: list) -> Iterator[tuple[int, dict, bytes]]:
    """(offset, header, body) of every intact frame in the first ``size`` bytes of file ``f``.

    A frame that fails its checks is skipped up to the next intact frame; each skipped stretch is
    appended to ``gaps`` as (offset, length).
    """
    pos = 0
    while pos < size:
        f.seek(pos)
        prefix = f.read(_PREFIX.size)
        ok = False
        if len(prefix) == _PREFIX.size:
            magic, n_head, n_body, crc = _PREFIX.unpack(prefix)
            end = pos + _PREFIX.size + n_head + n_body
            if magic == MAGIC and n_head <= _MAX_HEADER and n_body <= _MAX_BODY and end <= size:
                payload = f.read(n_head + n_body)
                if len(payload) == n_head + n_body and \
                        zlib.crc32(payload, zlib.crc32(_LENGTHS.pack(n_head, n_body))) == crc:
                    try:
                        head = json.loads(payload[:n_head])
                        ok = isinstance(head, dict) and isinstance(head.get("t"), (int, float))
                    except ValueError:
                        ok = False
        if ok:
            yield pos, head, payload[n_head:]
            pos = end
            continue
        nxt = _find_magic(f, pos + 1, size)
        gaps.append((pos, nxt - pos))
        pos = nxt


def _find_magic(f, start: int, size: int, chunk: int = 1 << 20) -> int:
    """Offset of the next MAGIC at or after ``start`` (``size`` if none)."""
    pos = start
    while pos < size:
        f.seek(pos)
        data = f.read(min(chunk, size - pos) + len(MAGIC) - 1)
        hit = data.find(MAGIC)
        if hit >= 0 and pos + hit < size:
            return pos + hit
        if len(data) < len(MAGIC):
            break
        pos += max(1, len(data) - len(MAGIC) + 1)
    return size


# ---- shards -------------------------------------------------------------------------------------------
@dataclass
class _ShardInfo:
    path: str
    name: str
    size: int
    index: dict | None = None  # the sealed shard's index, None while open (or if its writer died)

    @property
    def sealed(self) -> bool:
        return self.index is not None


@dataclass
class _Summary:
    records: int = 0
    oldest: float | None = None
    newest: float | None = None
    sorted: bool = True

    def add(self, t: float) -> None:
        if self.newest is not None and t < self.newest:
            self.sorted = False
        self.records += 1
        self.oldest = t if self.oldest is None else min(self.oldest, t)
        self.newest = t if self.newest is None else max(self.newest, t)

    def to_index(self, size: int) -> dict:
        return {"records": self.records, "bytes": size, "oldest": self.oldest, "newest": self.newest,
                "sorted": self.sorted, "format": FORMAT_VERSION}


@dataclass
class _OpenShard:
    path: str
    fd: int
    opened: float  # monotonic
    size: int = 0
    summary: _Summary = field(default_factory=_Summary)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def _in_range(t: float, since: float | None, until: float | None) -> bool:
    return (since is None or t >= since) and (until is None or t < until)


def _overlaps(index: dict, since: float | None, until: float | None) -> bool:
    if not index["records"]:
        return False
    return (since is None or index["newest"] >= since) and (until is None or index["oldest"] < until)


def _positive(name: str, value, allow_none: bool = False, integer: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {what} {bound}{' or None' if allow_none else ''}; got {value!r}")
    return value


class TrafficLog:
    """Append-only traffic log at ``location`` (a folder, or an fsspec URL); reading sees every writer's records.

    ``append`` buffers; the buffer is flushed (made durable) once it holds ``flush_records`` records
    or its oldest record waited ``flush_interval_s`` (a background thread flushes an idle buffer; None
    turns the thread off). Shards rotate at ``shard_bytes`` or after ``shard_max_age_s``.
    Read-only use needs no writes: a writer's first shard is created by its first flush.
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
        self.flush_records = _positive("flush_records", flush_records, integer=True)
        self.flush_interval_s = _positive("flush_interval_s", flush_interval_s, allow_none=True)
        self.shard_bytes = _positive("shard_bytes", shard_bytes, integer=True)
        self.shard_max_age_s = _positive("shard_max_age_s", shard_max_age_s)
        self.max_pending = _positive("max_pending", max_pending if max_pending is not None else 64 * flush_records,
                                     integer=True)
        self.location = os.fspath(location)
        self.fs, self.root = fsspec.core.url_to_fs(self.location, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.root = os.path.abspath(self.root)
        self._buf_lock = threading.Lock()
        self._io_lock = threading.RLock()
        self._closed = False
        self._start_writer()

    # ---- writer state -------------------------------------------------------------------------------
    def _start_writer(self) -> None:
        """(Re)initialise this process's writer identity; also run in a forked child."""
        self._pid = os.getpid()
        self._writer_id = f"{_host()}-{self._pid}-{secrets.token_hex(4)}"
        self._seq = 0
        self._buffer: list[tuple[float, bytes]] = []
        self._buffer_since = 0.0
        self._acked = 0
        self._dropped = 0
        self._shard: _OpenShard | None = None
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
        ``max_pending``; beyond it the oldest are dropped and counted in ``stats()["dropped"]``).
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
        this writer has had acknowledged in total. Raises TrafficLogError when it cannot write."""
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
            raise _log_error(
                e.errno, f"cannot write {len(chunk)} traffic record(s) ({len(data)} bytes) to shard {shard.path}: "
                f"{e.strerror or e}{full}; "
                f"{state}, earlier records and shards are intact; the records stay buffered and are retried "
                "on the next flush") from e
        shard.size += len(data)
        for t, _ in chunk:
            shard.summary.add(t)

    @staticmethod
    def _truncate(shard: _OpenShard) -> bool:
        try:
            os.ftruncate(shard.fd, shard.size)
            os.fsync(shard.fd)
            return True
        except OSError:
            return False

    def _open_local_shard(self) -> _OpenShard:
        path = os.path.join(self.root, self._new_shard_name())
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except OSError as e:
            raise _log_error(e.errno, f"cannot create a traffic log shard {path}: {e.strerror or e}") from e
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks the shard live until it is sealed or this process dies
        _fsync_dir(self.root)
        return _OpenShard(path, fd, time.monotonic())

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
                    _write_local_atomic(shard.path[:-len(SHARD_SUFFIX)] + INDEX_SUFFIX,
                                        json.dumps(shard.summary.to_index(shard.size)).encode())
                except OSError as e:
                    warnings.warn(f"traffic log: cannot write the index of {shard.path} ({e.strerror or e}); "
                                  "its records are intact and readers scan it instead", stacklevel=3)
        finally:
            os.close(shard.fd)

    def _write_object(self, chunk: list[tuple[float, bytes]]) -> None:
        data = b"".join(frame for _, frame in chunk)
        name = self._new_shard_name()
        path = posixpath.join(self.root, name)
        summary = _Summary()
        for t, _ in chunk:
            summary.add(t)
        try:
            self.fs.pipe_file(path, data)
        except Exception as e:
            raise _log_error(getattr(e, "errno", None),
                                  f"cannot store {len(chunk)} traffic record(s) ({len(data)} bytes) as {self.location}/"
                                  f"{name}: {e}; the records stay buffered and are retried on the next flush") from e
        try:
            index = json.dumps(summary.to_index(len(data))).encode()
            self.fs.pipe_file(path[:-len(SHARD_SUFFIX)] + INDEX_SUFFIX, index)
        except Exception as e:
            warnings.warn(f"traffic log: stored {path} but not its index ({e}); readers scan it instead", stacklevel=3)

    def close(self) -> None:
        """Flush, seal the open shard and stop the flush thread (idempotent)."""
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

    def __enter__(self) -> "TrafficLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading -------------------------------------------------------------------------------------
    def _list(self) -> list[_ShardInfo]:
        """Every shard (by name), with its index where it has one."""
        if self.local:
            try:
                entries = {e.name: e.stat().st_size for e in os.scandir(self.root) if e.is_file()}
            except FileNotFoundError:
                return []
            join = os.path.join
        else:
            try:
                self.fs.invalidate_cache(self.root)
                entries = {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                           for e in self.fs.ls(self.root, detail=True) if e.get("type") != "directory"}
            except FileNotFoundError:
                return []
            join = posixpath.join
        shards = []
        for name in sorted(entries):
            if not name.endswith(SHARD_SUFFIX):
                continue
            stem = name[:-len(SHARD_SUFFIX)]
            info = _ShardInfo(join(self.root, name), name, entries[name])
            if stem + INDEX_SUFFIX in entries:
                info.index = self._read_index(join(self.root, stem + INDEX_SUFFIX))
            shards.append(info)
        return shards

    def _read_index(self, path: str) -> dict | None:
        try:
            index = json.loads(self.fs.cat_file(path))
            if isinstance(index, dict) and {"records", "oldest", "newest", "sorted"} <= index.keys():
                return index
        except (OSError, ValueError):
            pass
        return None  # unreadable index: the shard is scanned instead

    def _open(self, shard: _ShardInfo):
        return open(shard.path, "rb") if self.local else self.fs.open(shard.path, "rb")

    def _scan(self, shard: _ShardInfo, gaps: list) -> Iterator[tuple[int, dict, bytes]]:
        try:
            with self._open(shard) as f:
                yield from _frames(f, shard.size, gaps)
        except FileNotFoundError:
            return  # pruned meanwhile

    def _summary(self, shard: _ShardInfo) -> dict:
        """The shard's index, or one computed by scanning it (open or crashed shards)."""
        if shard.index is None:
            s = _Summary()
            for _, head, _ in self._scan(shard, []):
                s.add(head["t"])
            shard.index = s.to_index(shard.size)
            shard.index["scanned"] = True
        return shard.index

    def _is_live(self, shard: _ShardInfo) -> bool:
        """Whether a writer still holds the (unsealed, local) shard open."""
        if not self.local or fcntl is None or (shard.index is not None and not shard.index.get("scanned")):
            return False
        try:
            fd = os.open(shard.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def _warn_gaps(self, shard: _ShardInfo, gaps: list) -> None:
        if not gaps:
            return
        offset, length = gaps[-1]
        if len(gaps) == 1 and offset + length == shard.size and self._is_live(shard):
            return  # the tail of a shard being written right now
        skipped = sum(n for _, n in gaps)
        where = ", ".join(f"{o}+{n}" for o, n in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        warnings.warn(f"traffic log shard {shard.path}: skipped {skipped} unreadable byte(s) in {len(gaps)} "
                      f"stretch(es) (offset+length: {where}): a torn write or corruption; the intact records "
                      "are returned", stacklevel=3)

    def _records(self, shard: _ShardInfo, since, until) -> Iterator[TrafficRecord]:
        """The shard's records in the range, in timestamp order."""
        gaps: list = []
        if self._summary(shard)["sorted"]:
            for _, head, body in self._scan(shard, gaps):
                if _in_range(head["t"], since, until):
                    yield decode_record(head, body)
        else:
            found = [(head["t"], i, head, body) for i, (_, head, body) in enumerate(self._scan(shard, gaps))
                     if _in_range(head["t"], since, until)]
            found.sort(key=lambda x: (x[0], x[1]))
            for _, _, head, body in found:
                yield decode_record(head, body)
        self._warn_gaps(shard, gaps)

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[TrafficRecord]:
        """Every writer's durable records with ``since <= timestamp < until``, in timestamp order.

        Shards are opened only when the merge reaches their oldest record, so memory stays small.
        Torn or corrupt stretches are skipped with a warning naming the shard.
        """
        since, until = self._check_range(since, until)
        shards = [s for s in self._list() if _overlaps(self._summary(s), since, until)]
        shards.sort(key=lambda s: (s.index["oldest"], s.name))
        heap: list = []
        nxt = 0
        counter = 0
        while heap or nxt < len(shards):
            while nxt < len(shards) and (not heap or shards[nxt].index["oldest"] <= heap[0][0]):
                it = self._records(shards[nxt], since, until)
                nxt += 1
                first = next(it, None)
                if first is not None:
                    heappush(heap, (first.timestamp, counter, first, it))
                    counter += 1
            if not heap:
                continue
            _, _, record, it = heappop(heap)
            yield record
            following = next(it, None)
            if following is not None:
                heappush(heap, (following.timestamp, counter, following, it))
                counter += 1

    @staticmethod
    def _check_range(since, until) -> tuple[float | None, float | None]:
        for name, v in (("since", since), ("until", until)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise ValueError(f"{name} must be unix seconds or None; got {v!r}")
        return since, until

    def count(self, since: float | None = None, until: float | None = None) -> int:
        """How many durable records have ``since <= timestamp < until`` (sealed shards counted from their index)."""
        since, until = self._check_range(since, until)
        total = 0
        for shard in self._list():
            index = self._summary(shard)
            if not _overlaps(index, since, until):
                continue
            if _in_range(index["oldest"], since, until) and _in_range(index["newest"], since, until):
                total += index["records"]
            else:
                total += sum(_in_range(head["t"], since, until) for _, head, _ in self._scan(shard, []))
        return total

    def stats(self) -> dict:
        """records, bytes, shards, oldest, newest of the durable log; pending, acknowledged, dropped of this writer."""
        shards = self._list()
        indexes = [self._summary(s) for s in shards]
        times = [i for i in indexes if i["records"]]
        return {"location": self.location, "records": sum(i["records"] for i in indexes),
                "bytes": sum(s.size for s in shards), "shards": len(shards),
                "oldest": min((i["oldest"] for i in times), default=None),
                "newest": max((i["newest"] for i in times), default=None),
                "pending": len(self._buffer), "acknowledged": self._acked, "dropped": self._dropped}

    # ---- retention -----------------------------------------------------------------------------------
    def prune(self, max_age_s: float | None = None, max_bytes: int | None = None) -> int:
        """Delete whole shards whose newest record is older than ``max_age_s``, then the oldest shards until
        the log is at most ``max_bytes``. Shards a live writer still appends to are never deleted.
        Returns the number of records removed."""
        if max_age_s is None and max_bytes is None:
            raise ValueError("prune needs max_age_s and/or max_bytes")
        _positive("max_age_s", max_age_s, allow_none=True, allow_zero=True)
        _positive("max_bytes", max_bytes, allow_none=True, integer=True, allow_zero=True)
        shards = self._list()
        removable = [s for s in shards if not self._is_live(s)]
        doomed: dict[str, _ShardInfo] = {}
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
        self._remove_orphan_indexes()
        return removed

    def _delete(self, shard: _ShardInfo) -> bool:
        index_path = shard.path[:-len(SHARD_SUFFIX)] + INDEX_SUFFIX
        try:
            if self.local:
                os.remove(shard.path)
                try:
                    os.remove(index_path)
                except FileNotFoundError:
                    pass
            else:
                self.fs.rm_file(shard.path)
                if self.fs.exists(index_path):
                    self.fs.rm_file(index_path)
        except FileNotFoundError:
            return False  # another pruner got there first
        except OSError as e:
            raise _log_error(e.errno, f"cannot delete traffic log shard {shard.path}: {e.strerror or e}") from e
        return True

    def _remove_orphan_indexes(self) -> None:
        """Indexes whose shard is gone (a prune interrupted between the two deletions)."""
        if not self.local:
            return
        try:
            names = set(os.listdir(self.root))
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(INDEX_SUFFIX) and name[:-len(INDEX_SUFFIX)] + SHARD_SUFFIX not in names:
                try:
                    os.remove(os.path.join(self.root, name))
                except OSError:
                    pass


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
            warnings.warn(f"traffic log {log.location}: could not flush at exit: {e}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _log_error(err: int | None, message: str) -> TrafficLogError:
    return TrafficLogError(err, message) if err else TrafficLogError(message)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_local_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))


# ---- records back to model inputs ------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _transform(info):
    from selfxit.zoo.data import image_transform
    return image_transform(info)


def record_input(record: TrafficRecord, info) -> torch.Tensor:
    """The model input of a logged record: ``record.input`` as is, else its encoded image decoded and
    preprocessed exactly as ``ImageFolderData`` does for ``info`` (a ``selfxit.zoo.ModelInfo``)."""
    from PIL import Image

    from selfxit.zoo.data import CorruptImageError

    if record.input is not None:
        if tuple(record.input.shape) != tuple(info.input_size):
            raise ValueError(f"record input has shape {tuple(record.input.shape)}; {info.name} expects "
                             f"{tuple(info.input_size)}")
        return record.input
    if record.encoded is None:
        raise ValueError(f"the record at {record.timestamp} has neither an input tensor nor encoded image bytes")
    try:
        with Image.open(io.BytesIO(record.encoded)) as img:
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"cannot decode the logged image at {record.timestamp} "
                                f"({record.content_type or 'unknown type'}): {e}") from e
    return _transform(info)(rgb)


def record_inputs(records: list[TrafficRecord], info) -> torch.Tensor:
    """``record_input`` of each record, stacked into one batch [B, C, H, W]."""
    if not records:
        raise ValueError("record_inputs needs at least one record")
    return torch.stack([record_input(r, info).float() for r in records])
