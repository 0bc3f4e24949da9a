"""What every request passes through first: a request id, the drain gate, and the last line against 500s.

:class:`RequestGuard` is a plain ASGI middleware (no ``BaseHTTPMiddleware``: that one buffers streaming
bodies and hides disconnects). For each HTTP request it

* assigns a request id from :class:`Lifecycle`, puts it in ``scope["state"]["request_id"]`` for the
  handlers and on the response as ``X-Request-ID``, so a client reporting a problem can quote it;
* answers 503 with ``Retry-After`` and ``Connection: close`` while the server drains (SIGTERM, see
  :mod:`selfxit.serve.server`), and counts the requests in flight, which the drain waits for;
* turns an exception no handler took (a bug, by definition) into a JSON 500 carrying the request id,
  logged with the traceback under that id: the server keeps serving and the log can be searched.

:func:`add_error_handlers` answers refused requests (:class:`ApiError`) and Starlette's own errors (404,
405) with the same JSON. :func:`json_response` is the one JSON writer: it never writes NaN or infinity
(JSON has neither; a value that is not finite is written as null and logged, instead of the response
failing half-way).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from selfxit.serve.requests import ApiError

log = logging.getLogger("selfxit.serve.app")  # the server logs under one name

REQUEST_ID_HEADER = "X-Request-ID"
DRAIN_RETRY_AFTER_S = 1


class Lifecycle:
    """Request ids, the requests in flight and the draining flag, shared by the guard, the app and the server."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.in_flight = 0  # HTTP requests and WebSocket batches being served
        self.draining = False

    def next_id(self) -> int:
        return next(self._ids)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (only called when the strict encoder failed)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(content: Any) -> str:
    """Strict JSON text: non-finite numbers become null (and are logged) instead of invalid JSON or a crash."""
    try:
        return json.dumps(content, allow_nan=False, separators=(",", ":"))
    except ValueError:
        log.error("an answer held a non-finite number; written as null (a bug): %.200r", content)
        return json.dumps(_finite(content), allow_nan=False, separators=(",", ":"))


class SafeJSONResponse(JSONResponse):
    """FastAPI's JSON response, written with :func:`dumps`."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse(content, status_code=status, headers=headers)


def request_id(scope) -> int | None:
    """The id the guard gave this request (None outside the guard)."""
    return (scope.get("state") or {}).get("request_id")


async def _send_json(send, status: int, content: dict, headers: dict[str, str]) -> None:
    body = dumps(content).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: request ids, the drain gate and the catch-all for bugs (see the module docstring)."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = self.lifecycle.next_id()
        scope.setdefault("state", {})["request_id"] = rid
        if scope["type"] == "websocket":  # batches are counted and guarded by the stream handler itself
            await self.app(scope, receive, send)
            return
        id_header = (REQUEST_ID_HEADER.lower().encode(), str(rid).encode())
        if self.lifecycle.draining:
            await _send_json(send, 503, {"error": "server is shutting down (draining); retry after "
                                                  f"{DRAIN_RETRY_AFTER_S} s, on another instance if there is one",
                                         "request_id": rid},
                             {"Retry-After": str(DRAIN_RETRY_AFTER_S), "Connection": "close",
                              REQUEST_ID_HEADER: str(rid)})
            return
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), id_header]
                if self.lifecycle.draining:  # answered during the drain: do not keep the connection
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("request %d (%s %s) failed with an unhandled error: a bug", rid, scope.get("method"),
                          scope.get("path"))
            if not started:  # else the server can only close the connection
                await _send_json(send, 500, {"error": f"internal error (a bug, logged as request {rid}): "
                                                      f"{type(exc).__name__}", "request_id": rid},
                                 {REQUEST_ID_HEADER: str(rid)})
        finally:
            self.lifecycle.in_flight -= 1


def add_error_handlers(app) -> None:
    """Every error is JSON ``{"error": "...", "request_id": n}``: refused requests and Starlette's own (404, 405).

    Exceptions no handler takes (bugs) reach :class:`selfxit.serve.guard.RequestGuard`, which answers 500.
    """
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        rid = request_id(request.scope)
        if exc.status >= 500 and exc.status != 503:  # 503 is back-pressure; any other 5xx is a bug
            log.error("request %s (%s %s) failed: %s", rid, request.method, request.url.path, exc.message)
        return json_response({"error": exc.message, "request_id": rid}, exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return json_response({"error": str(exc.detail), "request_id": request_id(request.scope)}, exc.status_code,
                             getattr(exc, "headers", None))
