"""The API's schema: pydantic models of what clients send and get back, and the OpenAPI text built from them.

Why pydantic models and not hand-written checks: FastAPI publishes ``/openapi.json`` from the same models,
so what the schema promises is what the server checks, and a schema-driven fuzzer (schemathesis) generates
requests from exactly the rules the server applies. The tensor's shape depends on the model being served
(a reload may not change it, see :func:`selfxit.serve.reload.check_compatible`), so the request-body schema
is built per app from that shape.

Validation errors are turned into one message that names each bad field, what it must be, and what was
sent (:func:`describe_errors`), never pydantic's multi-line dump (which would echo the whole body).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

DTYPES = ("float16", "float32", "float64")
MAX_JSON_DEPTH = 32  # a [B, C, H, W] tensor in a body object needs 5; room for a nested "id"
MAX_ID_CHARS = 256  # a stream message's "id" is echoed in every answer to it: keep that cheap
# normalised images lie within a few units; far larger values only risk non-finite outputs. The largest
# float16, so that every value the schema allows is finite at every dtype a client may declare.
MAX_ABS_INPUT = 65504.0

# what each field must be, said in the error message when it is not
FIELD_RULES = {
    "inputs": f"a nested list [B, C, H, W] of finite numbers within ±{MAX_ABS_INPUT:g} (normalised images)",
    "dtype": f"one of {', '.join(DTYPES)}",
    "sets": "a number in (0, 1), the prediction sets' miss rate alpha (e.g. 0.05)",
    "id": f"any JSON value of at most {MAX_ID_CHARS} characters (echoed in every answer)",
}


class TensorBody(BaseModel):
    """``POST /v1/predict`` as ``application/json``: a batch of normalised inputs."""

    model_config = ConfigDict(extra="ignore")

    inputs: list[Any] = Field(description="the batch [B, C, H, W] as nested lists of numbers, already normalised")
    dtype: Literal["float16", "float32", "float64"] = Field(
        "float32", description="precision the numbers are read at (the model runs in float32)")
    sets: float | None = Field(None, gt=0, lt=1, strict=True,
                               description="prediction-set miss rate alpha; adds 'set' to each item")


class StreamMessage(TensorBody):
    """A text message on ``/v1/stream``: a batch as in :class:`TensorBody`, and an ``id`` echoed in the answers."""

    id: JsonValue = Field(None, description=FIELD_RULES["id"])

    @field_validator("id")
    @classmethod
    def _short_id(cls, value):
        size = len(json.dumps(value))
        if size > MAX_ID_CHARS:
            raise ValueError(f"{size} characters of JSON, over {MAX_ID_CHARS}")
        return value


class Item(BaseModel):
    """One answered item."""

    model_config = ConfigDict(populate_by_name=True)

    index: int
    class_: int = Field(alias="class")
    probability: float = Field(ge=0, le=1)
    exit: str = Field(description="the exit layer that answered, or 'final' for the backbone")
    latency_ms: float
    set: list[int] | None = Field(None, description="the conformal prediction set (only when asked with 'sets')")


class PredictAnswer(BaseModel):
    request_id: int
    bundle: int = Field(description="generation of the bundle that answered")
    items: list[Item]


class ErrorBody(BaseModel):
    """Every error: what was wrong (and the limit, when a limit was hit) and the id the server logged it under."""

    error: str
    request_id: int | None = None


class ReloadAnswer(BaseModel):
    reloaded: bool
    bundle: dict[str, Any]


def describe_errors(exc: ValidationError, what: str) -> str:
    """One line naming each invalid field of ``what`` ('body', 'message'), what it must be and what it got."""
    parts = []
    for error in exc.errors(include_url=False, include_context=False):
        kind, loc = error["type"], error["loc"]
        if kind == "json_invalid":
            return f"{what} is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
        if not loc:
            return f'{what} must be a JSON object {{"inputs": [[...]]}} holding a [B, C, H, W] tensor'
        field = str(loc[0])
        where = "'" + ".".join(str(part) for part in loc) + "'"
        if kind == "missing":
            parts.append(f"{where} is required: {FIELD_RULES.get(field, 'see /openapi.json')}")
            continue
        got = repr(error.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        rule = FIELD_RULES.get(field)
        parts.append(f"{where} must be {rule} ({error['msg']}; got {got})" if rule else f"{where}: {error['msg']}")
    return "; ".join(parts) or f"{what} is invalid"


def tensor_schema(input_shape: tuple[int, ...], max_batch: int) -> dict:
    """JSON schema of ``inputs``: nested arrays [1..max_batch, *input_shape] of numbers."""
    schema: dict = {"type": "number", "minimum": -MAX_ABS_INPUT, "maximum": MAX_ABS_INPUT}
    for size in reversed(input_shape):
        schema = {"type": "array", "items": schema, "minItems": size, "maxItems": size}
    return {"type": "array", "items": schema, "minItems": 1, "maxItems": max_batch,
            "description": f"the batch [B, {', '.join(map(str, input_shape))}], B <= {max_batch}, normalised floats"}


def body_schema(model: type[BaseModel], input_shape: tuple[int, ...], max_batch: int) -> dict:
    """``model``'s JSON schema with ``inputs`` made exact for the served model."""
    schema = model.model_json_schema()
    schema["properties"]["inputs"] = tensor_schema(input_shape, max_batch)
    return schema


def predict_openapi(input_shape: tuple[int, ...], max_batch: int, images: bool, alphas: list[float]) -> dict:
    """The ``sets`` query and both body types (images when served) of ``POST /v1/predict``.

    ``alphas``: the prediction-set miss rates the served bundle is calibrated for, the only values ``sets``
    may take (none: no ``sets`` at all), so that a request valid by the schema is one the server answers.
    """
    body = body_schema(TensorBody, input_shape, max_batch)
    sets = {"type": "number", "enum": sorted(alphas)} if alphas else None
    body["properties"]["sets"] = {"anyOf": [sets, {"type": "null"}]} if sets else {"type": "null"}
    body["properties"]["sets"]["description"] = FIELD_RULES["sets"] + "; one the bundle is calibrated for"
    content: dict = {"application/json": {"schema": body}}
    if images:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1, "maxItems": max_batch,
                                     "items": {"type": "string", "format": "binary"},
                                     "description": "JPEG or PNG images, one file part each"}}}}
        for ctype in ("image/jpeg", "image/png"):
            content[ctype] = {"schema": {"type": "string", "format": "binary",
                                         "description": f"one {ctype.split('/')[1].upper()} image, the whole body"}}
    query = [{"name": "sets", "in": "query", "required": False, "schema": sets,
              "description": FIELD_RULES["sets"] + "; one the bundle is calibrated for"}] if sets else []
    return {"parameters": query, "requestBody": {"required": True, "content": content}}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}}


def error_responses(*statuses: int) -> dict:
    """FastAPI ``responses=`` for these error statuses (503 always: busy or draining, with Retry-After)."""
    text = {400: "malformed request (the message names the field and the rule)", 401: "missing or wrong admin token",
            404: "not found", 408: "request head or body did not arrive in time", 409: "bundle refused",
            413: "a limit was exceeded (the message names it)", 415: "unsupported content or image type",
            422: "well-formed input the model cannot answer (non-finite output)",
            503: "busy (expected queue wait too long) or shutting down", 504: "request timed out"}
    out: dict = {}
    for status in sorted({*statuses, 503}):
        out[status] = {"model": ErrorBody, "description": text[status]}
        if status == 503:
            out[status]["headers"] = _RETRY_AFTER
    return out
