"""Writing to a ``/v1/stream`` WebSocket: results, errors, and the id of a message that failed validation.

Every message is written with :func:`selfxit.serve.guard.dumps` (strict JSON: no NaN or infinity), not
Starlette's ``send_json``, which would write ``NaN`` tokens that no JSON parser accepts.
"""
from __future__ import annotations

import asyncio

from starlette.websockets import WebSocket

from selfxit.serve.guard import dumps
from selfxit.serve.requests import ApiError, load_json
from selfxit.serve.schema import MAX_ID_CHARS


async def ws_send(websocket: WebSocket, payload: dict) -> None:
    """Send one JSON message, written strictly (no NaN or infinity, see :func:`selfxit.serve.guard.dumps`)."""
    await websocket.send_text(dumps(payload))


async def ws_error(websocket: WebSocket, batch: int | None, tag, exc: ApiError, rid: int | None) -> None:
    payload = {"type": "error", "batch": batch, "id": tag, "status": exc.status, "error": exc.message,
               "request_id": rid}
    if exc.headers and "Retry-After" in exc.headers:
        payload["retry_after_s"] = int(exc.headers["Retry-After"])
    await ws_send(websocket, payload)


def message_id(text: str):
    """The ``id`` of a message that failed validation, when it can still be read (else None)."""
    try:
        payload = load_json(text, "message")
        tag = payload.get("id") if isinstance(payload, dict) else None
        return tag if len(dumps(tag)) <= MAX_ID_CHARS else None
    except ApiError:
        return None


async def forward(websocket: WebSocket, queue: asyncio.Queue, batch: int, tag) -> None:
    """Send each item's result to the client as it arrives; ``None`` ends the batch."""
    while (item := await queue.get()) is not None:
        await ws_send(websocket, {"type": "result", "batch": batch, "id": tag, **item})
