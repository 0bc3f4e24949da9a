"""The reading half of :class:`~selfxit.ops.traffic.TrafficLog`: listing shards, scanning, read and count.

Readers check every frame; a torn or corrupt stretch, or a CRC-valid frame whose header does not
describe its body, is skipped with a warning naming the shard (and what was wrong), and reading
resumes at the next intact frame. Sealed shards are summarised by their index; open shards
(or those of a writer that died) are scanned instead. Reading needs no write access.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import warnings
from heapq import heappop, heappush
from typing import Iterator

from selfxit.ops.traffic.codec import TrafficRecord, decode_record, iter_frames
from selfxit.ops.traffic.layout import (
    INDEX_SUFFIX,
    SHARD_SUFFIX,
    ShardInfo,
    Summary,
    check_range,
    held_live,
    in_range,
    overlaps,
)


class TrafficReader:
    """Mixin: reading every writer's durable records of a TrafficLog (``fs``, ``root``, ``local`` are set
    by ``TrafficLog.__init__``)."""

    def _list(self) -> list[ShardInfo]:
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
            info = ShardInfo(join(self.root, name), name, entries[name])
            if stem + INDEX_SUFFIX in entries:
                info.index = self._read_index(join(self.root, stem + INDEX_SUFFIX))
            shards.append(info)
        return shards

    def _read_index(self, path: str) -> dict | None:
        try:
            index = json.loads(self.fs.cat_file(path))
            if _valid_index(index):
                return index
        except (OSError, ValueError, RecursionError):
            pass
        return None  # unreadable index: the shard is scanned instead

    def _open(self, shard: ShardInfo):
        return open(shard.path, "rb") if self.local else self.fs.open(shard.path, "rb")

    def _scan(self, shard: ShardInfo, gaps: list) -> Iterator[tuple[int, dict, bytes]]:
        try:
            with self._open(shard) as f:
                yield from iter_frames(f, shard.size, gaps)
        except FileNotFoundError:
            return  # pruned meanwhile

    def _summary(self, shard: ShardInfo) -> dict:
        """The shard's index, or one computed by scanning it (open or crashed shards)."""
        if shard.index is None:
            s = Summary()
            for _, head, _ in self._scan(shard, []):
                s.add(head["t"])
            shard.index = s.to_index(shard.size)
            shard.index["scanned"] = True
        return shard.index

    def _is_live(self, shard: ShardInfo) -> bool:
        """Whether a writer still holds the (unsealed, local) shard open."""
        if not self.local or (shard.index is not None and not shard.index.get("scanned")):
            return False
        return held_live(shard.path)

    def _warn_gaps(self, shard: ShardInfo, gaps: list) -> None:
        if not gaps:
            return
        offset, length, reason = gaps[-1]
        if len(gaps) == 1 and reason is None and offset + length == shard.size and self._is_live(shard):
            return  # the tail of a shard being written right now
        skipped = sum(n for _, n, _ in gaps)
        where = ", ".join(f"{o}+{n}" for o, n, _ in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        reasons = sorted({r for _, _, r in gaps if r})
        kinds = ["a torn write or corruption"] if any(r is None for _, _, r in gaps) else []
        kinds += [f"a record that does not match its header ({r})" for r in reasons[:3]]
        why = "; ".join(kinds) + (f"; and {len(reasons) - 3} more problem(s)" if len(reasons) > 3 else "")
        warnings.warn(f"traffic log shard {shard.path}: skipped {skipped} unreadable byte(s) in {len(gaps)} "
                      f"stretch(es) (offset+length: {where}): {why}; the intact records are returned",
                      stacklevel=3)

    @staticmethod
    def _decode(head: dict, body: bytes, offset: int, gaps: list) -> TrafficRecord | None:
        """The record, or None (and a gap) if it cannot be rebuilt despite a consistent header."""
        try:
            return decode_record(head, body)
        except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
            gaps.append((offset, 0, f"{type(e).__name__}: {str(e)[:120]}"))
            return None

    def _records(self, shard: ShardInfo, since, until) -> Iterator[TrafficRecord]:
        """The shard's records in the range, in timestamp order."""
        gaps: list = []
        if self._summary(shard)["sorted"]:
            for offset, head, body in self._scan(shard, gaps):
                if in_range(head["t"], since, until):
                    record = self._decode(head, body, offset, gaps)
                    if record is not None:
                        yield record
        else:
            found = [(head["t"], i, offset, head, body)
                     for i, (offset, head, body) in enumerate(self._scan(shard, gaps))
                     if in_range(head["t"], since, until)]
            found.sort(key=lambda x: (x[0], x[1]))
            for _, _, offset, head, body in found:
                record = self._decode(head, body, offset, gaps)
                if record is not None:
                    yield record
        self._warn_gaps(shard, gaps)

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[TrafficRecord]:
        """Every writer's durable records with ``since <= timestamp < until``, in timestamp order.

        Shards are opened only when the merge reaches their oldest record, so memory stays small.
        Torn or corrupt stretches are skipped with a warning naming the shard.
        """
        since, until = check_range(since, until)
        shards = [s for s in self._list() if overlaps(self._summary(s), since, until)]
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

    def count(self, since: float | None = None, until: float | None = None) -> int:
        """How many durable records have ``since <= timestamp < until`` (sealed shards counted from their
        index, so counting a large log reads almost nothing)."""
        since, until = check_range(since, until)
        total = 0
        for shard in self._list():
            index = self._summary(shard)
            if not overlaps(index, since, until):
                continue
            if in_range(index["oldest"], since, until) and in_range(index["newest"], since, until):
                total += index["records"]
            else:
                total += sum(in_range(head["t"], since, until) for _, head, _ in self._scan(shard, []))
        return total

    def stats(self) -> dict:
        """records, bytes, shards, oldest, newest of the durable log; pending, acknowledged, dropped of this
        writer (what a health endpoint reports)."""
        shards = self._list()
        indexes = [self._summary(s) for s in shards]
        times = [i for i in indexes if i["records"]]
        return {"location": self.location, "records": sum(i["records"] for i in indexes),
                "bytes": sum(s.size for s in shards), "shards": len(shards),
                "oldest": min((i["oldest"] for i in times), default=None),
                "newest": max((i["newest"] for i in times), default=None),
                "pending": len(self._buffer), "acknowledged": self._acked, "dropped": self._dropped}


def _valid_index(index) -> bool:
    """Whether a parsed index file has the fields readers rely on, with their types (else: scan the shard)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not isinstance(index, dict) or not {"records", "oldest", "newest", "sorted"} <= index.keys():
        return False
    records = index["records"]
    if isinstance(records, bool) or not isinstance(records, int) or records < 0 \
            or not isinstance(index["sorted"], bool):
        return False
    if records == 0:
        return True
    return number(index["oldest"]) and number(index["newest"]) and index["oldest"] <= index["newest"]
