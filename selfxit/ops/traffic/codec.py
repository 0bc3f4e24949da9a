"""The traffic record and its frame: what one logged request item is, and how it travels as bytes.

A frame is ``b"SXTR"``, header length, body length (uint32 little-endian), CRC-32 of lengths + header
+ body, then a JSON header (timestamp, exit, prediction, tensor dtypes and shapes, ...) and a body
holding the tensors' raw bytes followed by the encoded image bytes. No pickle: a log written by one
version (or one host) is read by any other, and a damaged byte anywhere fails the CRC.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

SOURCES = ("serve", "collect")
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
    encoded image bytes. Validation happens here, at append time, so a bad record fails in the caller
    and never reaches a shard.
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
    """A record from a frame's JSON header (bytes or parsed) and body; readers parse the header once to
    filter by time, and only then pay for the tensors."""
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
    """The record in one frame from ``encode_record``; ValueError if it is torn or corrupt, so a caller
    holding a single frame gets the same checks a reader applies to a shard."""
    gaps: list = []
    found = list(iter_frames(io.BytesIO(frame), len(frame), gaps))
    if gaps or len(found) != 1:
        raise ValueError(f"not one intact traffic record frame ({len(frame)} bytes; {len(found)} intact frame(s), "
                         f"{sum(n for _, n in gaps)} unreadable byte(s))")
    _, head, body = found[0]
    return decode_record(head, body)


def iter_frames(f, size: int, gaps: list) -> Iterator[tuple[int, dict, bytes]]:
    """(offset, header, body) of every intact frame in the first ``size`` bytes of file ``f``.

    A frame that fails its checks is skipped up to the next intact frame (one torn write must not
    hide the records after it); each skipped stretch is appended to ``gaps`` as (offset, length).
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
