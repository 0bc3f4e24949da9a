"""The traffic record and its frame: what one logged request item is, and how it travels as bytes.

A frame is ``b"SXTR"``, header length, body length (uint32 little-endian), CRC-32 of lengths + header
+ body, then a JSON header (timestamp, exit, prediction, tensor dtypes and shapes, ...) and a body
holding the tensors' raw bytes followed by the encoded image bytes. No pickle: a log written by one
version (or one host) is read by any other, and a damaged byte anywhere fails the CRC. A frame whose
CRC holds but whose header does not describe its body (:func:`check_header`) is corrupt too: readers
skip it with a warning instead of failing on it.
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
# tensor dtypes a record may carry, with their item sizes: what the reader can rebuild from raw bytes
TENSOR_DTYPES = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2,
                 "float32": 4, "float64": 8, "complex64": 8, "complex128": 16}
_TENSOR_NAMES = ("input", "backbone_probs")  # in the order encode_record writes them into the body
_MAX_DIMS = 8
_MAX_DIM = (1 << 31) - 1
_HEADER_KEYS = ("v", "t", "content_type", "exit", "prediction", "bundle_version", "shadow", "source", "meta",
                "tensors", "encoded")


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
    if r.input is not None and (str(r.input.dtype).removeprefix("torch.") not in TENSOR_DTYPES
                                or r.input.dim() > _MAX_DIMS):
        raise ValueError(f"TrafficRecord.input must have one of the dtypes {', '.join(TENSOR_DTYPES)} and at most "
                         f"{_MAX_DIMS} dimensions; got {r.input.dtype} with shape {tuple(r.input.shape)}")
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor(name: str, spec) -> tuple[str | None, int]:
    """(what is wrong with one tensor description, or None; its byte count)."""
    if not isinstance(spec, dict):
        return f"tensor {name!r} is described by a JSON {type(spec).__name__}, not an object", 0
    dtype, shape, nbytes = spec.get("dtype"), spec.get("shape"), spec.get("nbytes")
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        return f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(TENSOR_DTYPES)}", 0
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS \
            or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        return (f"tensor {name!r} has shape {shape!r}; a shape is a list of at most {_MAX_DIMS} integers "
                f"in 0..{_MAX_DIM}"), 0
    if name == "backbone_probs" and (dtype != "float32" or len(shape) != 1):
        return f"backbone_probs must be float32 [classes]; got {dtype} of shape {shape}", 0
    expected = math.prod(shape) * TENSOR_DTYPES[dtype]
    if not _is_int(nbytes) or nbytes != expected:
        return f"tensor {name!r} ({dtype} of shape {shape}) takes {expected} bytes but nbytes says {nbytes!r}", 0
    return None, expected


def check_header(head, body_len: int) -> str | None:
    """What is inconsistent in a frame's parsed JSON header, given its body length; None when it decodes.

    Every field :func:`encode_record` writes must be present with its type, tensors must have a known
    dtype and a shape whose size matches ``nbytes``, and the tensors plus the encoded bytes must add up
    to exactly the body. The reader checks this before decoding, so a CRC-valid frame whose header lies
    is skipped as corrupt and never reaches torch.
    """
    if not isinstance(head, dict):
        return f"the header is a JSON {type(head).__name__}, not an object"
    missing = [k for k in _HEADER_KEYS if k not in head]
    if missing:
        return f"the header lacks {', '.join(missing)} (a record header has {', '.join(_HEADER_KEYS)})"
    if not _is_int(head["v"]) or not 1 <= head["v"] <= FORMAT_VERSION:
        return f"format version {head['v']!r} is not one this reader knows (1..{FORMAT_VERSION})"
    t = head["t"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return f"timestamp t={t!r} is not a finite number of unix seconds"
    for key in ("content_type", "exit", "bundle_version"):
        if head[key] is not None and not isinstance(head[key], str):
            return f"{key} must be a string or null; got {head[key]!r}"
    if head["prediction"] is not None and not _is_int(head["prediction"]):
        return f"prediction must be an integer or null; got {head['prediction']!r}"
    if not isinstance(head["shadow"], bool):
        return f"shadow must be true or false; got {head['shadow']!r}"
    if head["source"] not in SOURCES:
        return f"source must be one of {', '.join(SOURCES)}; got {head['source']!r}"
    if head["meta"] is not None and not isinstance(head["meta"], dict):
        return f"meta must be an object or null; got a JSON {type(head['meta']).__name__}"
    tensors, encoded = head["tensors"], head["encoded"]
    if not isinstance(tensors, dict) or not set(tensors) <= set(_TENSOR_NAMES):
        return f"tensors must be an object with keys among {', '.join(_TENSOR_NAMES)}; got {str(tensors)[:80]!r}"
    if encoded is not None and not (_is_int(encoded) and encoded >= 0):
        return f"encoded must be a byte count >= 0 or null; got {encoded!r}"
    total = encoded or 0
    for name, spec in tensors.items():
        problem, nbytes = _check_tensor(name, spec)
        if problem:
            return problem
        total += nbytes
    if total != body_len:
        return (f"the header accounts for {total} body bytes (tensors {total - (encoded or 0)} + encoded "
                f"{encoded or 0}) but the body holds {body_len}")
    return None


def _parse_header(header: bytes, body_len: int) -> tuple[dict | None, str | None]:
    """(parsed header, None) or (None, what is wrong with it)."""
    try:
        head = json.loads(header)
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
        return None, f"the header is not valid JSON ({type(e).__name__}: {str(e)[:80]})"
    problem = check_header(head, body_len)
    return (None, problem) if problem else (head, None)


def decode_record(header: bytes | dict, body: bytes) -> TrafficRecord:
    """A record from a frame's JSON header (bytes or parsed) and body; readers parse the header once to
    filter by time, and only then pay for the tensors. ValueError (naming the field) if the header does
    not describe the body (:func:`check_header`)."""
    if isinstance(header, (bytes, bytearray)):
        head, problem = _parse_header(bytes(header), len(body))
    else:
        head, problem = header, check_header(header, len(body))
    if problem or head is None:
        raise ValueError(f"inconsistent traffic record header: {problem}")
    tensors, pos = {}, 0
    for name in _TENSOR_NAMES:
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
        why = "; ".join(sorted({reason for _, _, reason in gaps if reason}))
        raise ValueError(f"not one intact traffic record frame ({len(frame)} bytes; {len(found)} intact frame(s), "
                         f"{sum(n for _, n, _ in gaps)} unreadable byte(s)){': ' + why if why else ''}")
    _, head, body = found[0]
    return decode_record(head, body)


def iter_frames(f, size: int, gaps: list) -> Iterator[tuple[int, dict, bytes]]:
    """(offset, header, body) of every intact frame in the first ``size`` bytes of file ``f``.

    A frame that fails its checks is skipped up to the next intact frame (one torn write must not
    hide the records after it); each skipped stretch is appended to ``gaps`` as (offset, length,
    reason): reason is None for a torn or damaged stretch, or says what is wrong with the header of a
    CRC-valid frame (:func:`check_header`), which is skipped whole.
    """
    pos = 0
    while pos < size:
        f.seek(pos)
        prefix = f.read(_PREFIX.size)
        if len(prefix) == _PREFIX.size:
            magic, n_head, n_body, crc = _PREFIX.unpack(prefix)
            end = pos + _PREFIX.size + n_head + n_body
            if magic == MAGIC and n_head <= _MAX_HEADER and n_body <= _MAX_BODY and end <= size:
                payload = f.read(n_head + n_body)
                if len(payload) == n_head + n_body and \
                        zlib.crc32(payload, zlib.crc32(_LENGTHS.pack(n_head, n_body))) == crc:
                    head, problem = _parse_header(payload[:n_head], n_body)
                    if head is not None:
                        yield pos, head, payload[n_head:]
                    else:  # the lengths are CRC-checked: skip exactly this frame
                        gaps.append((pos, end - pos, problem))
                    pos = end
                    continue
        nxt = _find_magic(f, pos + 1, size)
        gaps.append((pos, nxt - pos, None))
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
