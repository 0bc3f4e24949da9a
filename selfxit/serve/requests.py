"""Parsing and validating what clients send: multipart images, JSON tensors, limits, prediction-set alphas.

Everything here is a plain function of the request bytes (or a Starlette ``Request``, which Ray Serve
deployments receive too) and explicit limits: no app state, so another front end can share the same
rules and the same error messages. A refused request raises :class:`ApiError` (HTTP status + a message
naming the problem); the front end turns it into its own error response.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from selfxit.zoo.images import CorruptImageError, ImageLimitError, open_rgb

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/octet-stream"}
IMAGE_FORMATS = ("JPEG", "PNG")
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
BODY_TYPES = ("multipart/form-data", "application/json")
_LIMIT_STATUS = {"format": 415, "pixels": 413}


class ApiError(Exception):
    """A request the server refuses: HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class RequestLimits:
    """The limits a request is checked against (a subset of ServeConfig, so front ends need not share it)."""

    max_batch: int = 64
    max_body_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096

    @classmethod
    def of(cls, config) -> RequestLimits:
        """The limits of anything with the three attributes (a ServeConfig)."""
        return cls(config.max_batch, config.max_body_bytes, config.max_image_pixels)


def content_type(header: str | None) -> str:
    """The bare media type of a Content-Type header, lower case ('' when missing)."""
    return (header or "").split(";")[0].strip().lower()


def check_body_type(ctype: str) -> str:
    """Refuse (415) a predict body that is neither multipart images nor a JSON tensor."""
    if ctype not in BODY_TYPES:
        raise ApiError(415, f"unsupported content type {ctype or 'none'!r}; send multipart/form-data "
                            "(images in field 'files') or application/json {\"inputs\": [...]}")
    return ctype


def sets_alpha(value: Any, where: str) -> float | None:
    """A request's prediction-set alpha (None when not asked for); ApiError(400) when it is not in (0, 1)."""
    if value is None or value == "":
        return None
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if isinstance(value, bool) or not 0 < alpha < 1:
        raise ApiError(400, f"{where} must be a number in (0, 1), the prediction sets' miss rate alpha "
                            f"(e.g. 0.05); got {value!r}")
    return alpha


def json_tensor(payload: Any, max_batch: int) -> torch.Tensor:
    """``{"inputs": [...], "dtype": ...}`` -> a float tensor; the shape is checked later against the model."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ApiError(400, 'JSON body must be an object {"inputs": [[...]]} holding a [B, C, H, W] tensor')
    dtype_name = payload.get("dtype", "float32")
    if dtype_name not in FLOAT_DTYPES:
        raise ApiError(400, f"dtype must be one of {sorted(FLOAT_DTYPES)} (normalised images); got {dtype_name!r}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise ApiError(400, f"inputs must be a nested list [B, C, H, W] of numbers; got {type(inputs).__name__}")
    if len(inputs) > max_batch:
        raise ApiError(413, f"batch of {len(inputs)} items exceeds max_batch {max_batch}")
    try:
        array = np.asarray(inputs)
    except ValueError as exc:
        raise ApiError(400, f"inputs must be a rectangular nested list [B, C, H, W] (ragged: {exc})") from exc
    if array.dtype.kind not in "fiu":
        kind = {"b": "booleans", "U": "strings", "O": "mixed or null values"}.get(array.dtype.kind, str(array.dtype))
        raise ApiError(400, f"inputs must be numbers (float dtype); got {kind}")
    array = array.astype(FLOAT_DTYPES[dtype_name])
    if not np.isfinite(array).all():
        raise ApiError(400, "inputs contain NaN or infinity")
    return torch.from_numpy(array).float()


def load_json(data: bytes | str, what: str = "body") -> Any:
    """Decode JSON, refusing (400) what does not parse; ``what`` names it in the message."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"{what} is not valid JSON: {exc}") from exc


def parse_json_body(body: bytes, max_batch: int) -> tuple[torch.Tensor, Any]:
    """(the tensor, the body's "sets" value or None) of a JSON predict body (CPU-bound: run it off the loop)."""
    payload = load_json(body)
    return json_tensor(payload, max_batch), payload.get("sets")


def decode_image(data: bytes, name: str, transform: Callable, max_pixels: int) -> torch.Tensor:
    """One JPEG/PNG -> the model's normalised input, through the project's one decoder (selfxit.zoo.images).

    A corrupt image is a 400, an unsupported format a 415 and too many pixels a 413 (checked from the
    header, before any pixel is decoded).
    """
    try:
        rgb = open_rgb(data, name=name, formats=IMAGE_FORMATS, max_pixels=max_pixels)
    except ImageLimitError as exc:
        raise ApiError(_LIMIT_STATUS.get(exc.kind, 400), str(exc)) from exc
    except CorruptImageError as exc:
        raise ApiError(400, str(exc)) from exc
    return transform(rgb)


def decode_images(blobs: list[tuple[str, bytes]], transform: Callable | None, max_pixels: int) -> torch.Tensor:
    """Named encoded images -> one batch [B, C, H, W] (CPU-bound: run it off the loop)."""
    if transform is None:
        raise ApiError(415, "this server has no image preprocessing; send a JSON tensor")
    return torch.stack([decode_image(data, name, transform, max_pixels) for name, data in blobs])


def image_type(data: bytes) -> str:
    """The content type recorded with a logged image (only JPEG and PNG get past decoding)."""
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def check_batch(x: torch.Tensor, max_batch: int, ee) -> None:
    """Refuse a batch that is too large (413) or that the model cannot take (400: shape, dtype)."""
    if len(x) > max_batch:
        raise ApiError(413, f"batch of {len(x)} items exceeds max_batch {max_batch}")
    try:
        ee.check_input(x)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from exc


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes {max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"body exceeds max_body_bytes {max_body_bytes}")
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_images(request: Request, body: bytes, max_batch: int) -> list[tuple[str, bytes]]:
    """The uploads of a multipart body already read (field ``files``, repeated) as (name, bytes).

    Refuses a malformed body (400), more than ``max_batch`` files (413), text fields and content types
    that are not images (415). Nothing is decoded here.
    """
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_batch + 1, max_fields=100,
                                                         max_part_size=1 << 20)
    except (MultiPartException, StarletteHTTPException) as exc:  # starlette wraps the first in the second
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise ApiError(413, f"too many files: max_batch is {max_batch}") from exc
        raise ApiError(400, f"malformed multipart body: {detail}") from exc
    try:
        parts = form.getlist("files")
        if not parts:
            raise ApiError(400, "no images: send them as the repeated multipart file field 'files'")
        if len(parts) > max_batch:
            raise ApiError(413, f"batch of {len(parts)} images exceeds max_batch {max_batch}")
        blobs = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                raise ApiError(400, f"files[{i}] is a text field; send each image as a file upload")
            name = f"files[{i}] ({part.filename or 'unnamed'})"
            ctype = content_type(part.content_type or "application/octet-stream")
            if ctype not in IMAGE_TYPES:
                raise ApiError(415, f"{name}: unsupported content type {ctype!r}; send image/jpeg or image/png")
            blobs.append((name, await part.read()))
        return blobs
    finally:
        await form.close()
