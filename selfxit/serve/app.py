"""Serve an early-exit model over HTTP and WebSocket (FastAPI + uvicorn), with micro-batching and hot reload.

Endpoints (all errors are 4xx/5xx JSON ``{"error": "..."}`` naming the problem):

``POST /v1/predict``
    Either ``multipart/form-data`` with the images (JPEG or PNG) as the repeated file field ``files``,
    or ``application/json`` ``{"inputs": [[[[...]]]]}``: a tensor [B, C, H, W] already normalised
    (optional ``"dtype"``: float32 (default), float16 or float64). Answer::

        {"request_id": 7, "bundle": 1, "items": [
            {"index": 0, "class": 3, "probability": 0.91, "exit": "layer1", "latency_ms": 6.2}, ...]}

    ``exit`` is the exit layer's name, or ``"final"`` for the backbone; ``latency_ms`` is the time
    from the request reaching the handler to that item's answer.

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
    counts the client's messages on the connection from 0; ``id`` echoes the client's (JSON only).
    Prediction sets: ``/v1/stream?sets=alpha`` for every batch on the connection, or ``"sets": alpha``
    in one JSON message. One batch is answered at a time per connection; open more for concurrency.
``GET /healthz``
    Serving bundle (generation, exits, thresholds), the last reload attempt and queue length;
    ``"status"`` is ``"degraded"`` while the last reload was refused (the old bundle keeps serving).
``GET /metrics``
    Prometheus text (:mod:`selfxit.serve.metrics`): requests, errors, items per exit, item latency
    histogram, micro-batches, reloads, queue, live agreement and hit rates.
``POST /v1/reload``
    Load the bundle folder now (it is also polled: manifest and heads file stat every
    ``reload_poll_s``). A bundle that fails to load is refused (409), logged and shown in
    ``/healthz``; the old one keeps serving (:mod:`selfxit.serve.reload`).
``GET /v1/monitor``
    Live agreement with the backbone on shadow-run items (overall and per exit), per-exit hit rates
    on all items, and the traffic log's state (see :mod:`selfxit.serve.monitor`); also in ``/healthz``.

Requests are parsed and checked by :mod:`selfxit.serve.requests` and micro-batched by
:mod:`selfxit.serve.batching`. Traffic log and shadow sampling: ``ServeConfig.log`` appends
``log_fraction`` of the served items to a traffic log, and ``shadow_fraction`` of them also run the
whole backbone after their answer went out. A log that fails is switched off (reason in ``/healthz``).

Traffic-log hook: ``create_app(..., traffic_logger=...)`` takes an object with
``on_result(item: ServedItem)`` (or a plain callable taking a ``ServedItem``). It is called on the event
loop thread for every answered item, so it must be quick (hand I/O to a queue or thread). If it also
has ``live_agreement() -> (agreement, samples) | None``, ``/metrics`` exports that as
``selfxit_live_agreement`` and ``selfxit_shadow_samples``.

The command line (``python -m selfxit serve``) is :mod:`selfxit.cli.serve`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from selfxit.extras import require_extra

require_extra("serve", "selfxit serve")
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from selfxit.serve import requests as rq
from selfxit.serve.batching import Batcher, Job
from selfxit.serve.config import (
    NullTrafficLogger,
    ServeConfig,
    ServedItem,
    TrafficLogger,
    as_traffic_logger,
)
from selfxit.serve.metrics import CONTENT_TYPE, ServeMetrics, monitor_gauges
from selfxit.serve.reload import BundleLoader, Reloader
from selfxit.serve.requests import ApiError

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
        self.reloader = Reloader(ee_loader, bundle, self.metrics.reload)
        self.transform = None
        if info is not None:
            from selfxit.zoo.data import image_transform
            self.transform = image_transform(info)
        self.batcher = Batcher(config, lambda: self.reloader.served, self.deliver, self.metrics, monitor)
        self.metrics.add_gauges(self.gauges)
        self.started = time.time()
        self._last_id = 0

    # ---- plumbing -----------------------------------------------------------------------------------
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

    def next_id(self) -> int:
        self._last_id += 1
        return self._last_id

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
        x = await asyncio.to_thread(rq.decode_images, blobs, self.transform, self.limits.max_image_pixels)
        return x, [(data, rq.image_type(data)) for _, data in blobs]

    async def answer(self, x: torch.Tensor, endpoint: str, t0: float, on_item: Callable[[dict], None],
                     request_id: int, encoded: list[tuple[bytes, str]] | None = None,
                     sets_alpha: float | None = None) -> Job:
        """Queue ``x`` and wait until every item is answered (or the request times out)."""
        if sets_alpha is not None:  # fail fast; the worker checks again against the bundle it runs
            try:
                self.reloader.served.ee.set_quantiles(sets_alpha)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
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
        try:
            x, encoded, sets_alpha = await self._predict_input(request)
            self.check_batch(x)
            items: list[dict] = []
            request_id = self.next_id()
            job = await self.answer(x, "predict", t0, items.append, request_id, encoded, sets_alpha)
        except ApiError as exc:
            self.metrics.error("predict", exc.status)
            raise
        items.sort(key=lambda item: item["index"])
        return {"request_id": request_id, "bundle": job.generation, "items": items}

    async def _predict_input(self, request: Request):
        """(tensor, encoded images or None, prediction-set alpha or None) of a predict request."""
        ctype = rq.check_body_type(rq.content_type(request.headers.get("content-type")))
        sets_alpha = rq.sets_alpha(request.query_params.get("sets"), "query parameter 'sets'")
        body = await rq.read_body(request, self.limits.max_body_bytes)
        if ctype == "multipart/form-data":
            x, encoded = await self.decode(await rq.multipart_images(request, body, self.limits.max_batch))
            return x, encoded, sets_alpha
        x, body_sets = await asyncio.to_thread(rq.parse_json_body, body, self.limits.max_batch)
        return x, None, rq.sets_alpha(body_sets, "'sets'") if body_sets is not None else sets_alpha

    # ---- WebSocket /v1/stream -----------------------------------------------------------------------
    async def stream(self, websocket: WebSocket):
        await websocket.accept()
        try:
            connection_sets = rq.sets_alpha(websocket.query_params.get("sets"), "query parameter 'sets'")
        except ApiError as exc:
            await websocket.send_json({"type": "error", "batch": None, "id": None, "status": exc.status,
                                       "error": exc.message})
            await websocket.close(code=1008)
            return
        batch = 0
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._stream_batch(websocket, message, batch, connection_sets)
                batch += 1
        except WebSocketDisconnect:
            return
        except Exception:  # the client went away mid-batch, or the socket failed: drop this connection only
            log.debug("websocket closed", exc_info=True)

    async def _stream_batch(self, websocket: WebSocket, message: dict, batch: int,
                            sets_alpha: float | None) -> None:
        """Answer one message: a result per item as its exit fires, then done (or one error message)."""
        t0 = time.perf_counter()
        self.metrics.request("stream")
        tag, encoded = None, None
        try:
            if message.get("bytes") is not None:
                x, encoded = await self.decode([("image", message["bytes"])])
            else:
                payload = rq.load_json(message.get("text") or "", "message")
                tag = payload.get("id") if isinstance(payload, dict) else None
                x = await asyncio.to_thread(rq.json_tensor, payload, self.limits.max_batch)
                if payload.get("sets") is not None:
                    sets_alpha = rq.sets_alpha(payload["sets"], "'sets'")
            self.check_batch(x)
            queue: asyncio.Queue = asyncio.Queue()
            sender = asyncio.create_task(_forward(websocket, queue, batch, tag))
            try:
                job = await self.answer(x, "stream", t0, queue.put_nowait, self.next_id(), encoded, sets_alpha)
            finally:
                queue.put_nowait(None)
                await sender
            await websocket.send_json({"type": "done", "batch": batch, "id": tag, "items": len(x),
                                       "bundle": job.generation,
                                       "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
        except ApiError as exc:
            self.metrics.error("stream", exc.status)
            await websocket.send_json({"type": "error", "batch": batch, "id": tag, "status": exc.status,
                                       "error": exc.message})

    # ---- the rest -----------------------------------------------------------------------------------
    async def healthz(self):
        return {"status": "degraded" if self.reloader.degraded else "ok", "plain": self.config.plain,
                "bundle": self.reloader.served.describe, "last_reload": self.reloader.last_reload,
                "queue_items": self.batcher.pending_items, "uptime_s": round(time.time() - self.started, 1),
                "monitor": self.monitor.snapshot()}

    async def monitor_view(self):
        """Live agreement with the backbone (shadow-run items), per-exit hit rates and agreement, logging."""
        return self.monitor.snapshot()

    async def metrics_text(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def reload_now(self):
        return {"reloaded": True, "bundle": await self.reloader.reload("POST /v1/reload")}


async def _forward(websocket: WebSocket, queue: asyncio.Queue, batch: int, tag) -> None:
    """Send each item's result to the client as it arrives; ``None`` ends the batch."""
    while (item := await queue.get()) is not None:
        await websocket.send_json({"type": "result", "batch": batch, "id": tag, **item})


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"error": "..."}``: refused requests, Starlette's own (404, 405), and bugs (500)."""
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


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

    app = FastAPI(title="selfxit", lifespan=service.lifespan)
    app.state.service, app.state.metrics, app.state.batcher = service, service.metrics, service.batcher
    app.state.monitor, app.state.reloader = monitor, service.reloader
    _add_error_handlers(app)
    app.add_api_route("/v1/predict", service.predict, methods=["POST"])
    app.add_api_websocket_route("/v1/stream", service.stream)
    app.add_api_route("/healthz", service.healthz, methods=["GET"])
    app.add_api_route("/v1/monitor", service.monitor_view, methods=["GET"])
    app.add_api_route("/metrics", service.metrics_text, methods=["GET"])
    app.add_api_route("/v1/reload", service.reload_now, methods=["POST"])
    return app
