"""Serve an early-exit model over HTTP and WebSocket (FastAPI + uvicorn), with micro-batching and hot reload.

Endpoints (every error is JSON ``{"error": "...", "request_id": n}`` naming the problem and, when a limit
was hit, the limit; every response carries ``X-Request-ID: n``, and a 5xx other than 503/504 is a bug,
logged with that id). The request bodies are validated with the pydantic models of :mod:`.schema`, which
``/openapi.json`` publishes (``docs=False`` turns it, ``/docs`` and ``/redoc`` off):

``POST /v1/predict``
    Either ``multipart/form-data`` with the images (JPEG or PNG) as the repeated file field ``files``,
    one image as the whole body (``image/jpeg`` or ``image/png``: no form parse, the cheapest for one image),
    or ``application/json`` ``{"inputs": [[[[...]]]]}``: a tensor [B, C, H, W] already normalised
    (optional ``"dtype"``: float32 (default), float16 or float64). Answer::

        {"request_id": 7, "bundle": 1, "items": [
            {"index": 0, "class": 3, "probability": 0.91, "exit": "layer1", "latency_ms": 6.2}, ...]}

    ``exit`` is the exit layer's name, or ``"final"`` for the backbone; ``latency_ms`` is the time
    from the request reaching the handler to that item's answer.

    Bounded work: at most ``max_batch`` items and ``max_body_bytes``; images' total pixels, read from
    their headers before any is decoded, at most ``max_request_pixels`` (413 naming it); decoding and
    JSON parsing run off the event loop. JSON nested deeper than 32 levels, non-finite numbers and values
    beyond ±1e6 are refused (400). Admission: a request expected to wait more than ``max_queue_wait_ms``
    in the queue gets 503 with ``Retry-After`` at once (see :mod:`.batching`).

    Prediction sets: ``?sets=0.05`` (or ``"sets": 0.05`` in a JSON body) adds ``"set": [3, 5]`` to each
    item: a conformal set of classes that holds the backbone's answer with probability >= 1 - alpha
    (see :mod:`selfxit.fit.conformal`; alpha must be one the bundle was calibrated for, e.g. 0.01, 0.05,
    0.1). An item the backbone answered gets ``[its class]``.
``WebSocket /v1/stream``
    The client sends one batch per message: a text message ``{"inputs": ..., "id": any}`` (as above)
    or a binary message holding one JPEG/PNG image. The server sends, as text JSON messages, one
    ``{"type": "result", "batch": n, "id": ..., "index", "class", "probability", "exit", "latency_ms"}``
    per item the moment its exit fires (early exits first), then ``{"type": "done", "batch": n,
    "id": ..., "items": B, "bundle": generation, "latency_ms": t}``; a bad batch gets ``{"type": "error",
    "batch": n, "id": ..., "status": 4xx, "error": "..."}`` and the connection stays usable. ``n``
    counts the client's messages on the connection from 0; ``id`` echoes the client's (JSON only). A bug
    while answering a message is an error message with status 500 and a ``request_id``; the socket stays
    open. Too large a message closes it with 1009, invalid UTF-8 text with 1007, a bad ``?sets=`` with 1008,
    a drain with 1001 (after an error message with status 503).
    Prediction sets: ``/v1/stream?sets=alpha`` for every batch on the connection, or ``"sets": alpha``
    in one JSON message. One batch is answered at a time per connection; open more for concurrency.
``GET /healthz``
    Serving bundle (generation, exits, thresholds), the last reload attempt and queue length;
    ``"status"`` is ``"degraded"`` while the last reload was refused (the old bundle keeps serving).
``GET /metrics``
    Prometheus text (:mod:`selfxit.serve.metrics`): requests, errors, items per exit, item latency
    histogram, micro-batches, reloads, queue, live agreement and hit rates.
``POST /v1/reload``
    Needs ``Authorization: Bearer <admin_token>`` when the server has one (401 otherwise; compared with
    ``hmac.compare_digest``); without one it is open, which :meth:`ServeConfig.validate` allows only on a
    loopback address or with ``trusted_network``. Load the bundle folder now (it is also polled: manifest and heads file stat every
    ``reload_poll_s``). A bundle that fails to load is refused (409), logged and shown in
    ``/healthz``; the old one keeps serving (:mod:`selfxit.serve.reload`).
``GET /v1/monitor``
    Live agreement with the backbone on shadow-run items (overall and per exit), per-exit hit rates
    on all items, and the traffic log's state (see :mod:`selfxit.serve.monitor`); also in ``/healthz``.
    With ``guard`` on, also the live guard's state (``alarmed``, ``scale``, ``certified_scale``, moves;
    see :mod:`selfxit.serve.guarding`).

Requests are parsed and checked by :mod:`selfxit.serve.requests` and micro-batched by
:mod:`selfxit.serve.batching`. Traffic log and shadow sampling: ``ServeConfig.log`` appends
``log_fraction`` of the served items to a traffic log, and ``shadow_fraction`` of them also run the
whole backbone after their answer went out. A log that fails is switched off (reason in ``/healthz``).

Traffic-log hook: ``create_app(..., traffic_logger=...)`` takes an object with
``on_result(item: ServedItem)`` (or a plain callable taking a ``ServedItem``). It is called on the event
loop thread for every answered item, so it must be quick (hand I/O to a queue or thread). If it also
has ``live_agreement() -> (agreement, samples) | None``, ``/metrics`` exports that as
``selfxit_live_agreement`` and ``selfxit_shadow_samples``.

The command line (``python -m selfxit serve``) is :mod:`selfxit.cli.serve`; :mod:`.server` runs the app
under uvicorn with a graceful drain on SIGTERM.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from selfxit.extras import require_extra

require_extra("serve", "selfxit serve")
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect  # noqa: E402
from fastapi.responses import Response  # noqa: E402

from selfxit.serve import requests as rq
from selfxit.serve.batching import Batcher, Job, TraceGate, runtime_status, warm_up
from selfxit.serve.config import (
    NullTrafficLogger,
    ServeConfig,
    ServedItem,
    TrafficLogger,
    as_traffic_logger,
)
from selfxit.serve.guard import Lifecycle, RequestGuard, SafeJSONResponse, add_error_handlers, request_id
from selfxit.serve.guarding import keeper_for
from selfxit.serve.metrics import CONTENT_TYPE, ServeMetrics, monitor_gauges
from selfxit.serve.reload import BundleLoader, Reloader
from selfxit.serve.requests import ApiError, busy
from selfxit.serve.schema import PredictAnswer, ReloadAnswer, StreamMessage, error_responses, predict_openapi
from selfxit.serve.stream import forward, message_id, ws_error, ws_send

__all__ = ["ApiError", "BundleLoader", "NullTrafficLogger", "ServeConfig", "ServedItem", "TrafficLogger",
           "create_app"]

log = logging.getLogger("selfxit.serve.app")


class _Service:
    """One app's serving state (bundle, worker, metrics, monitor) and its route handlers."""

    def __init__(self, config: ServeConfig, ee_loader: Callable[[], Any], info, logger: TrafficLogger, monitor):
        self.config, self.logger, self.monitor = config, logger, monitor
        self.limits = rq.RequestLimits.of(config)
        self.metrics = ServeMetrics()
        bundle = Path(config.bundle) if config.bundle else None
        self.gate = TraceGate()  # decodes vs torch.fx tracing (see TraceGate)
        self.guard = keeper_for(config, self.metrics, monitor)  # --guard: the live guard, built per bundle at load
        self.reloader = Reloader(ee_loader, bundle, self.metrics.reload, self.prepare)
        self.transform = None
        if info is not None:
            from selfxit.zoo.data import image_transform
            self.transform = image_transform(info)
        self.batcher = Batcher(config, lambda: self.reloader.served, self.deliver, self.metrics, monitor, self.gate)
        self.metrics.add_gauges(self.gauges)
        self.started = time.time()
        self.lifecycle = Lifecycle()

    # ---- plumbing -----------------------------------------------------------------------------------
    def prepare(self, ee) -> None:
        """Warm a loaded bundle up before it serves; with --guard, build its guard (the first bundle must be
        guardable; a reloaded one that is not serves unguarded, the reason in /healthz)."""
        warm_up(ee, self.gate)
        if self.guard is not None:
            with self.gate.exclusive():  # the shadow runner may trace the backbone
                self.guard.prepare(ee, strict=not self.guard.started)

    @asynccontextmanager
    async def lifespan(self, app):
        """Run the worker (and the bundle watcher) while the app serves; flush the traffic log at the end."""
        self.batcher.start()
        watcher = None
        if self.reloader.bundle is not None and self.config.reload_poll_s > 0:
            watcher = asyncio.create_task(self.reloader.watch(self.config.reload_poll_s))
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
            await asyncio.to_thread(self.batcher.stop)
            await asyncio.to_thread(self.monitor.close)
            if self.guard is not None:
                await asyncio.to_thread(self.guard.close)  # guard.json for the nightly job

    def deliver(self, job: Job, item: dict, exit_position: int, generation: int) -> None:
        """One item answered (on the event loop): count it, hand it to its request and to the traffic logger."""
        self.metrics.item(item["exit"], item["latency_ms"] / 1000)
        job.on_item(item)
        try:
            self.logger.on_result(ServedItem(job.request_id, job.endpoint, item["index"], item["class"],
                                             item["probability"], item["exit"], exit_position, item["latency_ms"],
                                             generation, job.x[item["index"]]))
        except Exception:
            log.exception("traffic logger failed (ignored)")

    def check_batch(self, x: torch.Tensor) -> None:
        rq.check_batch(x, self.limits.max_batch, self.reloader.served.ee)

    async def decode(self, blobs: list[tuple[str, bytes]]) -> tuple[torch.Tensor, list[tuple[bytes, str]]]:
        """(the batch, the encoded images with their content types for the traffic log), decoded off the loop."""
        x = await asyncio.to_thread(self._decode, blobs)
        return x, [(data, rq.image_type(data)) for _, data in blobs]

    def _decode(self, blobs: list[tuple[str, bytes]]) -> torch.Tensor:
        with self.gate.shared():  # the transform calls torch modules: never while torch.fx traces
            return rq.decode_images(blobs, self.transform, self.limits.max_image_pixels, self.limits.max_request_pixels)

    def check_alpha(self, alpha: float | None) -> None:
        """400 unless the serving bundle is calibrated for prediction sets at ``alpha`` (None: not asked)."""
        if alpha is not None:
            try:
                self.reloader.served.ee.set_quantiles(alpha)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc

    async def answer(self, x: torch.Tensor, endpoint: str, t0: float, on_item: Callable[[dict], None],
                     request_id: int, encoded: list[tuple[bytes, str]] | None = None,
                     sets_alpha: float | None = None) -> Job:
        """Queue ``x`` and wait until every item is answered (or the request times out)."""
        self.check_alpha(sets_alpha)  # fail fast; the worker checks again against the bundle it runs
        job = Job(x, asyncio.get_running_loop(), on_item, request_id, endpoint, t0, encoded, sets_alpha)
        self.batcher.submit(job)
        timeout = self.config.request_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(job.done), timeout)
        except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before 3.11)
            job.cancelled = True
            raise ApiError(504, f"request timed out after {timeout:g} s") from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        return job

    def gauges(self) -> dict:
        """The scrape-time gauges; a traffic logger with ``live_agreement`` overrides the monitor's figure."""
        live = getattr(self.logger, "live_agreement", None)
        value = live() if callable(live) else self.monitor.live_agreement()
        return monitor_gauges(self.monitor.snapshot(), value, self.batcher.pending_items,
                              self.reloader.served.generation)

    # ---- POST /v1/predict ---------------------------------------------------------------------------
    async def predict(self, request: Request):
        t0 = time.perf_counter()
        self.metrics.request("predict")
        rid = request_id(request.scope) or self.lifecycle.next_id()
        try:
            x, encoded, sets_alpha = await rq.predict_input(request, self.limits, self.decode, self.check_alpha)
            self.check_batch(x)
            items: list[dict] = []
            job = await self.answer(x, "predict", t0, items.append, rid, encoded, sets_alpha)
        except ApiError as exc:
            self.metrics.error("predict", exc.status)
            raise
        items.sort(key=lambda item: item["index"])
        return {"request_id": rid, "bundle": job.generation, "items": items}

    # ---- WebSocket /v1/stream -----------------------------------------------------------------------
    async def stream(self, websocket: WebSocket):
        await websocket.accept()
        try:
            connection_sets = rq.sets_alpha(websocket.query_params.get("sets"), "query parameter 'sets'")
        except ApiError as exc:
            await ws_error(websocket, None, None, exc, request_id(websocket.scope))
            await websocket.close(code=1008)
            return
        batch = 0
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if self.lifecycle.draining:  # no new batch: say when to come back, and close as "going away"
                    await ws_error(websocket, batch, None, busy("server is shutting down (draining)", 1), None)
                    await websocket.close(code=1001)
                    return
                self.lifecycle.in_flight += 1
                try:
                    await self._stream_batch(websocket, message, batch, connection_sets)
                finally:
                    self.lifecycle.in_flight -= 1
                batch += 1
        except WebSocketDisconnect:
            return
        except Exception:  # the socket itself failed (not a bad message: those are answered above)
            log.debug("websocket closed", exc_info=True)
            try:
                await websocket.close(code=1011)
            except Exception:
                pass

    async def _stream_batch(self, websocket: WebSocket, message: Mapping[str, Any], batch: int,
                            sets_alpha: float | None) -> None:
        """Answer one message: a result per item as its exit fires, then done (or one error message)."""
        t0 = time.perf_counter()
        self.metrics.request("stream")
        rid = self.lifecycle.next_id()
        tag, encoded = None, None
        try:
            if message.get("bytes") is not None:
                x, encoded = await self.decode([("image", message["bytes"])])
            else:
                text = message.get("text") or ""
                try:
                    x, parsed = await asyncio.to_thread(rq.parse_tensor_json, text, self.limits.max_batch,
                                                        StreamMessage, "message")
                except ApiError:
                    tag = await asyncio.to_thread(message_id, text)  # still echo the id with the error
                    raise
                tag = parsed.id
                if parsed.sets is not None:
                    sets_alpha = parsed.sets
            self.check_batch(x)
            queue: asyncio.Queue = asyncio.Queue()
            sender = asyncio.create_task(forward(websocket, queue, batch, tag))
            try:
                job = await self.answer(x, "stream", t0, queue.put_nowait, rid, encoded, sets_alpha)
            finally:
                queue.put_nowait(None)
                await sender
            await ws_send(websocket, {"type": "done", "batch": batch, "id": tag, "items": len(x),
                                    "bundle": job.generation,
                                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
        except ApiError as exc:
            self.metrics.error("stream", exc.status)
            if exc.status >= 500 and exc.status != 503:  # 503 is back-pressure; any other 5xx is a bug
                log.error("stream batch %d, request %d failed: %s", batch, rid, exc.message)
            await ws_error(websocket, batch, tag, exc, rid)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: log it under an id the client gets, and keep the connection
            log.exception("stream batch %d, request %d failed with an unhandled error: a bug", batch, rid)
            self.metrics.error("stream", 500)
            await ws_error(websocket, batch, tag, ApiError(500, f"internal error (a bug, logged as request {rid}): "
                                                              f"{type(exc).__name__}"), rid)

    # ---- the rest -----------------------------------------------------------------------------------
    async def healthz(self):
        return {"status": "degraded" if self.reloader.degraded else "ok", "plain": self.config.plain,
                "bundle": self.reloader.served.describe, "last_reload": self.reloader.last_reload,
                "queue_items": self.batcher.pending_items, "uptime_s": round(time.time() - self.started, 1),
                "monitor": self.monitor.snapshot(), "runtime": runtime_status(self.reloader.served.ee),
                **({"guard": self.guard.snapshot()} if self.guard is not None else {})}

    async def monitor_view(self):
        """Live agreement with the backbone (shadow-run items), per-exit hit rates and agreement, logging."""
        return self.monitor.snapshot()

    async def metrics_text(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def reload_now(self, request: Request):
        rq.check_admin(request, self.config.admin_token)
        return {"reloaded": True, "bundle": await self.reloader.reload("POST /v1/reload")}


def create_app(ee_loader: Callable[[], Any] | None = None, config: ServeConfig | None = None, *,
               info=None, traffic_logger: TrafficLogger | Callable[[ServedItem], None] | None = None,
               monitor=None) -> FastAPI:
    """Build the FastAPI app; the first bundle is loaded now (errors raise here, not on the first request).

    ``ee_loader()`` returns an EarlyExitModel and is called again on every reload; by default it is a
    :class:`BundleLoader` for ``config.bundle``/``config.model``. ``info`` (a ``ModelInfo``, default the
    loader's ``info``) gives image preprocessing; without it only tensor inputs are accepted.
    ``monitor`` (a :class:`selfxit.serve.monitor.TrafficMonitor`; by default one built from ``config.log``,
    ``config.log_fraction`` and ``config.shadow_fraction``) logs traffic and measures live agreement.
    """
    config = config or ServeConfig()
    config.validate()
    if ee_loader is None:
        if config.bundle is None or config.model is None:
            raise ValueError("create_app needs an ee_loader, or config.bundle and config.model")
        ee_loader = BundleLoader(config.bundle, config.model, config.weights, config.plain)
    info = info if info is not None else getattr(ee_loader, "info", None)
    if monitor is None:
        from selfxit.serve.monitor import MonitorConfig, TrafficMonitor
        monitor = TrafficMonitor(MonitorConfig(config.log, config.log_fraction, config.shadow_fraction))
    service = _Service(config, ee_loader, info, as_traffic_logger(traffic_logger), monitor)

    docs: dict[str, Any] = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="selfxit", lifespan=service.lifespan, default_response_class=SafeJSONResponse, **docs)
    app.state.service, app.state.metrics, app.state.batcher = service, service.metrics, service.batcher
    app.state.monitor, app.state.reloader, app.state.lifecycle = monitor, service.reloader, service.lifecycle
    add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(RequestGuard, lifecycle=service.lifecycle)
    return app


def _add_routes(app: FastAPI, service: _Service) -> None:
    """The routes, each documented in /openapi.json with its body schema and every status it can answer."""
    app.add_api_route("/v1/predict", service.predict, methods=["POST"],
                      responses={200: {"model": PredictAnswer}, **error_responses(400, 408, 413, 415, 422, 504)})
    app.add_api_websocket_route("/v1/stream", service.stream)
    app.add_api_route("/healthz", service.healthz, methods=["GET"], responses=error_responses())
    app.add_api_route("/v1/monitor", service.monitor_view, methods=["GET"], responses=error_responses())
    app.add_api_route("/metrics", service.metrics_text, methods=["GET"], response_class=Response,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                       "description": "Prometheus text format 0.0.4"}, **error_responses()})
    secured = bool(service.config.admin_token)
    app.add_api_route("/v1/reload", service.reload_now, methods=["POST"],
                      responses={200: {"model": ReloadAnswer}, **error_responses(409, *([401] if secured else []))},
                      openapi_extra={"security": [{"adminToken": []}]} if secured else None)
    plain_openapi, built_for = app.openapi, [-1]

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the predict body and ``sets`` of the bundle served now (rebuilt on reload)."""
        served = service.reloader.served
        if app.openapi_schema is None or built_for[0] != served.generation:
            app.openapi_schema = None
            schema = plain_openapi()
            alphas = list(getattr(getattr(served.ee, "conformal", None), "alphas", None) or [])
            schema["paths"]["/v1/predict"]["post"].update(predict_openapi(
                tuple(served.ee.input_shape), service.limits.max_batch, service.transform is not None, alphas))
            if secured:
                schema.setdefault("components", {}).setdefault("securitySchemes", {})["adminToken"] = {
                    "type": "http", "scheme": "bearer", "description": "the server's --admin-token"}
            built_for[0] = served.generation
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
