"""What the writer, the reader and retention agree on: shard and index names, index contents, the
live-shard lock, and the argument checks they share.

A shard is ``<start>-<host>-<pid>-<random>-<seq>.tlog``, written by ONE writer; its index
``<same name>.idx`` (JSON: records, bytes, oldest, newest, sorted) is written once the shard is
sealed. A local writer holds an exclusive ``flock`` on its open shard, so anyone can tell a shard
still being appended to from one whose writer died (the lock goes with the process).
"""
from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field

from selfxit.core.atomic import pid_alive
from selfxit.ops.traffic.codec import FORMAT_VERSION, TrafficLogError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: open shards are then never pruned
    fcntl = None

SHARD_SUFFIX = ".tlog"
INDEX_SUFFIX = ".idx"


@dataclass
class ShardInfo:
    """A shard as listed by a reader."""

    path: str
    name: str
    size: int
    index: dict | None = None  # the sealed shard's index, None while open (or if its writer died)

    @property
    def sealed(self) -> bool:
        return self.index is not None


@dataclass
class Summary:
    """Record count and time range of a shard, accumulated as records are written or scanned."""

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
class OpenShard:
    """The local shard a writer appends to."""

    path: str
    fd: int
    opened: float  # monotonic
    size: int = 0
    summary: Summary = field(default_factory=Summary)


def index_path(shard_path: str) -> str:
    """The index file that belongs to a shard."""
    return shard_path[:-len(SHARD_SUFFIX)] + INDEX_SUFFIX


def host() -> str:
    """This host's name as it appears in shard names (alphanumerics only, so names split on '-')."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def dead_writer(shard_name: str) -> bool:
    """Whether a shard name (``<start>-<host>-<pid>-<random>-<seq>.tlog``) says its writer ran on this host
    and no longer runs. False for another host's shard or a name that does not parse."""
    parts = shard_name.split("-")
    return len(parts) == 5 and parts[1] == host() and parts[2].isdigit() and not pid_alive(int(parts[2]))


def hold_live(fd: int) -> None:
    """Mark an open shard live until it is sealed or this process dies (then ``prune`` leaves it alone)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def held_live(path: str) -> bool:
    """Whether a live writer holds the local shard at ``path`` (see :func:`hold_live`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def in_range(t: float, since: float | None, until: float | None) -> bool:
    return (since is None or t >= since) and (until is None or t < until)


def overlaps(index: dict, since: float | None, until: float | None) -> bool:
    """Whether a shard with this index may hold records in [since, until)."""
    if not index["records"]:
        return False
    return (since is None or index["newest"] >= since) and (until is None or index["oldest"] < until)


def check_positive(name: str, value, allow_none: bool = False, integer: bool = False, allow_zero: bool = False):
    """``value`` if it is a finite number > 0 (or >= 0, or None, as allowed); else a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {what} {bound}{' or None' if allow_none else ''}; got {value!r}")
    return value


def check_range(since, until) -> tuple[float | None, float | None]:
    """Validate a [since, until) window of unix seconds (None: open-ended)."""
    for name, v in (("since", since), ("until", until)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
            raise ValueError(f"{name} must be unix seconds or None; got {v!r}")
    return since, until


def log_error(err: int | None, message: str) -> TrafficLogError:
    """A TrafficLogError carrying the OS errno when there is one (callers may branch on ENOSPC)."""
    return TrafficLogError(err, message) if err else TrafficLogError(message)
