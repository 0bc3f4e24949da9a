"""Parsing and validating what clients send: multipart images, JSON tensors, limits, prediction-set alphas.

Everything here is a plain function of the request bytes (or a Starlette ``Request``, which Ray Serve
deployments receive too) and explicit limits: no app state, so another front end can share the same
rules and the same error messages. A refused request raises :class:`ApiError` (HTTP status + a message
naming the problem); the front end turns it into its own error response.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from selfxit.serve.schema import MAX_ABS_INPUT, MAX_JSON_DEPTH, TensorBody, describe_errors
from selfxit.zoo.images import CorruptImageError, ImageLimitError, image_header, open_rgb

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/octet-stream"}
IMAGE_FORMATS = ("JPEG", "PNG")
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
RAW_IMAGE_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}  # one image as the whole body
BODY_TYPES = ("multipart/form-data", "application/json", *RAW_IMAGE_TYPES)
_LIMIT_STATUS = {"format": 415, "pixels": 413}


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message naming the problem, and extra response headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def busy(message: str, wait_s: float) -> ApiError:
    """A 503 telling the client when to come back (``Retry-After``, whole seconds, at least 1)."""
    retry = max(1, int(-(-wait_s // 1)))
    return ApiError(503, f"{message}; retry after {retry} s", {"Retry-After": str(retry)})


@dataclass(frozen=True)
class RequestLimits:
    """The limits a request is checked against (a subset of ServeConfig, so front ends need not share it)."""

    max_batch: int = 64
    max_body_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 64 * 512 * 512
    read_timeout_s: float = 10.0

    @classmethod
    def of(cls, config) -> RequestLimits:
        """The limits of a ServeConfig."""
        return cls(config.max_batch, config.max_body_bytes, config.max_image_pixels, config.request_pixels,
                   config.read_timeout_s)


def content_type(header: str | None) -> str:
    """The bare media type of a Content-Type header, lower case ('' when missing)."""
    return (header or "").split(";")[0].strip().lower()


def check_body_type(ctype: str) -> str:
    """Refuse (415) a predict body that is neither multipart images, one raw image nor a JSON tensor."""
    if ctype not in BODY_TYPES:
        raise ApiError(415, f"unsupported content type {ctype or 'none'!r}; send multipart/form-data "
                            "(images in field 'files'), one image as the body (image/jpeg or image/png) "
                            "or application/json {\"inputs\": [...]}")
    return ctype


_SIGNATURES = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}


def raw_image(body: bytes, ctype: str) -> list[tuple[str, bytes]]:
    """A raw ``image/jpeg`` or ``image/png`` body: one image, as the one (name, bytes) blob of a batch.

    Why a raw body: a multipart upload of one 224x224 JPEG costs the server a form parse (boundary scan,
    a spooled temporary file per part) that can take as long as the small model's forward pass; the raw
    body is the image's bytes and nothing else. Refused: an empty body (400), a body whose bytes are the
    other of the two formats than its Content-Type says (400, naming both). Anything else undecodable is
    left to :func:`decode_image` (400 corrupt, 415 another format, 413 too many pixels).
    """
    declared = RAW_IMAGE_TYPES[ctype]
    name = f"body ({ctype})"
    if not body:
        raise ApiError(400, f"empty {ctype} body: send one image's encoded bytes as the body")
    actual = next((fmt for fmt, magic in _SIGNATURES.items() if body.startswith(magic)), None)
    if actual is not None and actual != declared:
        raise ApiError(400, f"{name}: the bytes are a {actual} image but Content-Type says {ctype}; "
                            f"send Content-Type image/{actual.lower()}")
    return [(name, body)]


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


def tensor_of(inputs: list, dtype: str, max_batch: int) -> torch.Tensor:
    """Validated ``inputs`` -> a float32 tensor: rectangular, numbers only, finite, within ±MAX_ABS_INPUT.

    Finiteness and the bound are checked on the numbers as sent: 1e39 is a finite float64 but an infinite
    float32 (what the model runs in), and would come back as a NaN probability; within ±MAX_ABS_INPUT every
    dtype holds every value finitely. The shape is checked later, against the model.
    """
    if len(inputs) > max_batch:
        raise ApiError(413, f"batch of {len(inputs)} items exceeds max_batch {max_batch}")
    try:
        array = np.asarray(inputs)
    except ValueError as exc:
        raise ApiError(400, f"inputs must be a rectangular nested list [B, C, H, W] (ragged: {exc})") from exc
    if array.dtype.kind not in "fiu":
        kind = {"b": "booleans", "U": "strings", "O": "nulls, huge integers or mixed values"}.get(
            array.dtype.kind, str(array.dtype))
        raise ApiError(400, f"inputs must be numbers (float dtype); got {kind}")
    with np.errstate(over="ignore", invalid="ignore"):
        wide = array.astype(np.float64)  # the numbers as sent (huge integers become inf here)
        finite = np.isfinite(wide)
        if not finite.all():
            where = [int(i) for i in np.argwhere(~finite)[0]]
            raise ApiError(400, f"inputs must be finite numbers: inputs{where} is NaN, infinite or too large to be "
                                "a float")
        peak = float(np.abs(wide).max()) if wide.size else 0.0
        if peak > MAX_ABS_INPUT:  # within the bound, every dtype (float16 included) holds the value finitely
            raise ApiError(400, f"inputs must be finite, normalised values within ±{MAX_ABS_INPUT:g}; got |x| up to {peak:g}")
        array = wide.astype(FLOAT_DTYPES[dtype]).astype(np.float32, copy=False)  # the precision asked, then float32
    return torch.from_numpy(np.ascontiguousarray(array))


_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _bracket_depth(raw: bytes) -> int:
    if not raw:
        return 0
    return max(0, int(np.cumsum(_DEPTH_STEP[np.frombuffer(raw, np.uint8)], dtype=np.int32).max()))


def check_depth(data: bytes | str, what: str = "body", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse (400) JSON nested deeper than ``limit``, from the raw text, before any parser recurses into it.

    Counted with numpy over the bytes (linear, no recursion); brackets inside strings are only taken out
    (a second, regex pass) when the first count is over the limit, so the usual body costs one pass.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = _bracket_depth(raw)
    if depth > limit and b'"' in raw:
        depth = _bracket_depth(_JSON_STRING.sub(b'""', raw))
    if depth > limit:
        raise ApiError(400, f"{what} JSON is nested {depth} levels deep; the limit is {limit} "
                            "(a [B, C, H, W] tensor in an object needs 5)")


def load_json(data: bytes | str, what: str = "body") -> Any:
    """Decode JSON, refusing (400) what is too deeply nested or does not parse; ``what`` names it."""
    check_depth(data, what)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise ApiError(400, f"{what} is not valid JSON: {exc}") from exc


Body = TypeVar("Body", bound=TensorBody)


def parse_tensor_json(data: bytes | str, max_batch: int, model: type[Body] = TensorBody,  # type: ignore[assignment]
                      what: str = "body") -> tuple[torch.Tensor, Body]:
    """(the tensor, the validated body) of a JSON body or message (CPU-bound: run it off the loop).

    The depth is bounded before parsing; the structure (object, ``inputs`` list, ``dtype``, ``sets``) is
    checked by the pydantic model that ``/openapi.json`` publishes; the numbers by :func:`tensor_of`.
    """
    check_depth(data, what)
    try:
        body = model.model_validate_json(data)
    except ValidationError as exc:
        raise ApiError(400, describe_errors(exc, what)) from None
    return tensor_of(body.inputs, body.dtype, max_batch), body


def json_tensor(payload: Any, max_batch: int) -> torch.Tensor:
    """An already decoded ``{"inputs": [...], "dtype": ...}`` -> a float tensor (for front ends that parse JSON)."""
    try:
        body = TensorBody.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(400, describe_errors(exc, "JSON body")) from None
    return tensor_of(body.inputs, body.dtype, max_batch)


def parse_json_body(body: bytes, max_batch: int) -> tuple[torch.Tensor, float | None]:
    """(the tensor, the body's "sets" alpha or None) of a JSON predict body (CPU-bound: run it off the loop)."""
    x, parsed = parse_tensor_json(body, max_batch, TensorBody)
    return x, parsed.sets


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


def check_pixels(blobs: list[tuple[str, bytes]], max_pixels: int, max_request_pixels: int) -> int:
    """The request's total pixels, read from the image headers only; 413 over either limit, 400 if unreadable.

    Decoding costs CPU in proportion to pixels and a small file can hold a huge image (a flat 4096 x 4096
    PNG is a few kB), so the bytes limit bounds nothing here: the sum of width x height is what is bounded.
    """
    total, largest = 0, (0, 0)
    for name, data in blobs:
        try:
            _, width, height = image_header(data, name)
        except CorruptImageError as exc:
            raise ApiError(400, str(exc)) from exc
        if width * height > max_pixels:
            raise ApiError(413, f"{name}: {width}x{height} pixels exceeds max_image_pixels {max_pixels}")
        total += width * height
        largest = max(largest, (width, height), key=lambda wh: wh[0] * wh[1])
    if total > max_request_pixels:
        raise ApiError(413, f"the {len(blobs)} images hold {total:,} pixels (largest {largest[0]}x{largest[1]}), "
                            f"over max_request_pixels {max_request_pixels:,} per request: send fewer or smaller "
                            "images (each is resized to the model's input anyway)")
    return total


def decode_images(blobs: list[tuple[str, bytes]], transform: Callable | None, max_pixels: int,
                  max_request_pixels: int | None = None) -> torch.Tensor:
    """Named encoded images -> one batch [B, C, H, W] (CPU-bound: run it off the loop).

    With ``max_request_pixels``, every header is read and the total checked before the first pixel is decoded.
    """
    if transform is None:
        raise ApiError(415, "this server has no image preprocessing; send a JSON tensor")
    if max_request_pixels is not None:
        check_pixels(blobs, max_pixels, max_request_pixels)
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


async def predict_input(request: Request, limits: RequestLimits,
                        decode: Callable[[list[tuple[str, bytes]]], Any],
                        check_alpha: Callable[[float | None], None]) -> tuple[torch.Tensor, Any, float | None]:
    """(tensor, encoded images or None, prediction-set alpha or None) of a ``POST /v1/predict`` request.

    Every front end (``selfxit serve``, the Ray Serve deployment) reads a predict body with this, so their
    limits and 4xx answers cannot drift apart. ``decode`` is the front end's awaitable image decoder
    (blobs -> (tensor, encoded)); ``check_alpha`` refuses an alpha its bundle was not calibrated for.
    """
    ctype = check_body_type(content_type(request.headers.get("content-type")))
    alpha = sets_alpha(request.query_params.get("sets"), "query parameter 'sets'")
    check_alpha(alpha)  # even when the body overrides it: a bad query is refused, not ignored
    body = await read_body(request, limits.max_body_bytes, limits.read_timeout_s)
    if ctype == "multipart/form-data":
        x, encoded = await decode(await multipart_images(request, body, limits.max_batch))
        return x, encoded, alpha
    if ctype in RAW_IMAGE_TYPES:  # one image as the whole body: no form to parse
        x, encoded = await decode(raw_image(body, ctype))
        return x, encoded, alpha
    x, body_sets = await asyncio.to_thread(parse_json_body, body, limits.max_batch)
    return x, None, body_sets if body_sets is not None else alpha


async def read_body(request: Request, max_body_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed the limit (declared or streamed).

    A body that has not fully arrived after ``timeout_s`` (a Content-Length that promised more than was
    sent, a stalled upload) gets 408 and the connection is closed, so it cannot hold a request slot
    forever; a client that hung up mid-body gets a 400 nobody reads (not a logged 500).
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes {max_body_bytes}")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"body exceeds max_body_bytes {max_body_bytes}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before 3.11)
        expected = f" of the {declared} declared" if declared else ""
        raise ApiError(408, f"request body incomplete after {timeout_s:g} s (read_timeout_s): got {size} bytes"
                            f"{expected}", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, f"client disconnected after {size} bytes of the body") from None
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


def check_admin(request: Request, token: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (nothing to check without a token:
    ServeConfig.validate allows that only on loopback or a trusted network). Compared in constant time."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, f"{request.method} {request.url.path} needs the admin token: send "
                            "'Authorization: Bearer <token>' (the server's --admin-token or SELFXIT_ADMIN_TOKEN)",
                       {"WWW-Authenticate": 'Bearer realm="selfxit admin"'})
