"""One shard file of the medial dataset: a block of rows, self-describing and checksummed.

Layout (little-endian)::

    bytes 0-7     magic b"SXMEDIAL"
    bytes 8-11    header length L (uint32)
    bytes 12-15   CRC-32 of the header
    bytes 16..    header: JSON (rows, writer, sequence number, and each array's dtype, per-row shape, offset)
    then          the index block: split uint8[n], source int64[n], labels int64[n], row CRC-32s uint32[n, A]
                  (one per row of each of the A row arrays), with its own CRC-32 in the header
    then          the row arrays, each [n, *shape] and 64-byte aligned: probs float32 [n, classes], then
                  act_0 .. act_{k-1} [n, *stored shape] (float16 unless the dataset says float32)

A reader gets a shard's index from one read of its first bytes, and any rows of any array by offset
(each row checked against its CRC), so training can read batches at random without loading a shard.
A shard is written under a temporary name and renamed when complete: a file under its final name is
whole, and what a killed writer leaves under a temporary name is ignored.
"""
from __future__ import annotations

import json
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"SXMEDIAL"
PREFIX_BYTES = 64 * 1024  # first read of a shard: the header and, for shards of up to ~1,000 rows, the index
SUFFIX = ".shard"
TMP_PREFIX = ".tmp-"
INDEX = (("split", "uint8"), ("source", "int64"), ("labels", "int64"))


class ShardError(ValueError):
    """A shard file that is damaged (bad magic, header, size or checksum)."""


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def _row_crcs(array: np.ndarray) -> np.ndarray:
    rows = array.reshape(len(array), -1).view(np.uint8) if len(array) else array.reshape(0, 0)
    return np.fromiter((zlib.crc32(row.data) for row in rows), dtype=np.uint32, count=len(array))


@dataclass
class ShardIndex:
    """What a shard holds: its rows' split/source/labels, each row array's layout, and the row checksums."""

    path: str
    rows: int
    size: int
    writer: str
    seq: int
    arrays: dict[str, dict]  # name -> {"dtype", "shape" (per row), "offset", "row_bytes", "column"}
    split: np.ndarray
    source: np.ndarray
    labels: np.ndarray
    crc: np.ndarray  # [rows, arrays] uint32


def encode(arrays: dict[str, np.ndarray], index: dict[str, np.ndarray], writer: str, seq: int):
    """(header bytes, [(offset, array)] to write after it, total size) of a shard holding ``arrays`` (row arrays,
    in order) and ``index`` (split, source, labels)."""
    n = len(index["split"])
    crc = np.stack([_row_crcs(np.ascontiguousarray(a)) for a in arrays.values()], axis=1) if arrays else \
        np.zeros((n, 0), np.uint32)
    small = [np.ascontiguousarray(index[name], dtype=dtype) for name, dtype in INDEX] + [crc.astype(np.uint32)]
    blob = b"".join(a.tobytes() for a in small)
    layout: dict[str, dict[str, Any]] = {}
    rel: dict[str, int] = {}  # offsets after the index block
    offset = 0
    for column, (name, array) in enumerate(arrays.items()):
        if len(array) != n:
            raise ValueError(f"shard array {name} has {len(array)} rows, the index {n}")
        layout[name] = {"dtype": str(array.dtype), "shape": list(array.shape[1:]), "offset": 0,
                        "row_bytes": int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize,
                        "column": column}
        rel[name], offset = offset, _align(offset + array.nbytes)
    index_spec: dict[str, int] = {"offset": 0, "bytes": len(blob), "crc": zlib.crc32(blob)}
    header = {"format": 2, "rows": n, "writer": writer, "seq": seq, "arrays": layout, "index": index_spec}
    start = -1
    while True:  # the offsets are written in the header, whose length moves them: iterate to the fixed point
        head = json.dumps(header, separators=(",", ":")).encode()
        if _align(16 + len(head)) == start:
            break
        start = _align(16 + len(head))
        index_spec["offset"] = start
        for name in layout:
            layout[name]["offset"] = _align(start + len(blob)) + rel[name]
    prefix = MAGIC + struct.pack("<II", len(head), zlib.crc32(head)) + head
    pieces = [(start, blob)] + [(layout[name]["offset"], a) for name, a in arrays.items()]
    size = max([start + len(blob)] + [layout[k]["offset"] + a.nbytes for k, a in arrays.items()])
    return prefix, pieces, size


def write(fs, path: str, arrays: dict[str, np.ndarray], index: dict[str, np.ndarray], writer: str, seq: int) -> int:
    """Write one shard to ``path`` on fsspec filesystem ``fs`` atomically (temporary name, then rename).
    Returns its size in bytes."""
    prefix, pieces, size = encode(arrays, index, writer, seq)
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(prefix)
            at = len(prefix)
            for offset, piece in pieces:
                f.write(b"\0" * (offset - at))
                data = piece if isinstance(piece, bytes) else np.ascontiguousarray(piece).data.cast("B")
                f.write(data)
                at = offset + len(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # noqa: BLE001 - best effort: the temporary file is ignored by readers anyway
            pass
        raise
    return size


def parse(path: str, prefix: bytes, size: int, read_more=None) -> ShardIndex:
    """The index of a shard from its first bytes (``read_more(start, end)`` fetches the rest of the index block
    when it extends past them); ShardError naming the damage otherwise."""
    if len(prefix) < 16 or prefix[:8] != MAGIC:
        raise ShardError(f"shard {path} is damaged: not a selfxit medial shard (bad magic)")
    length, crc = struct.unpack("<II", prefix[8:16])
    head = prefix[16:16 + length]
    if len(head) != length or zlib.crc32(head) != crc:
        raise ShardError(f"shard {path} is damaged: its header fails its checksum")
    header = json.loads(head)
    start, nbytes = header["index"]["offset"], header["index"]["bytes"]
    blob = prefix[start:start + nbytes]
    if len(blob) < nbytes and read_more is not None and start + nbytes <= size:
        blob = read_more(start, start + nbytes)
    if len(blob) != nbytes or zlib.crc32(blob) != header["index"]["crc"]:
        raise ShardError(f"shard {path} is damaged: its row index is cut short or fails its checksum")
    n, arrays = header["rows"], header["arrays"]
    expected = max([start + nbytes] + [a["offset"] + n * a["row_bytes"] for a in arrays.values()])
    if size != expected:
        raise ShardError(f"shard {path} is damaged: {size:,} bytes where its header says {expected:,} "
                         "(cut short or appended to)")
    parts, at = {}, 0
    for name, dtype in INDEX:
        parts[name] = np.frombuffer(blob, dtype=dtype, count=n, offset=at).copy()
        at += n * np.dtype(dtype).itemsize
    crc_table = np.frombuffer(blob, dtype=np.uint32, count=n * len(arrays), offset=at).reshape(n, len(arrays)).copy()
    return ShardIndex(path, n, size, header["writer"], header["seq"], arrays, parts["split"], parts["source"],
                      parts["labels"], crc_table)


def read_rows(f, shard: ShardIndex, name: str, start: int, count: int) -> np.ndarray:
    """Rows ``start .. start + count`` of array ``name`` from open file ``f`` of ``shard``, each checked."""
    spec = shard.arrays[name]
    row_bytes = spec["row_bytes"]
    f.seek(spec["offset"] + start * row_bytes)
    data = f.read(count * row_bytes)
    if len(data) != count * row_bytes:
        raise ShardError(f"shard {shard.path} is damaged: rows {start}..{start + count} of {name} are cut short")
    view = memoryview(data)
    expected = shard.crc[start:start + count, spec["column"]]
    for i in range(count):
        if zlib.crc32(view[i * row_bytes:(i + 1) * row_bytes]) != expected[i]:
            raise ShardError(f"shard {shard.path} is damaged: row {start + i} of {name} fails its checksum")
    return np.frombuffer(data, dtype=spec["dtype"]).reshape(count, *spec["shape"])
