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
    in one JSON message.
    One batch is answered at a time per connection; open more connections for concurrency.
``GET /healthz``
    Serving bundle (generation, exits, thresholds), the last reload attempt and queue length;
    ``"status"`` is ``"degraded"`` while the last reload was refused (the old bundle keeps serving).
``GET /metrics``
    Prometheus text: requests, errors, items per exit, item latency histogram, micro-batches,
    reloads, and live agreement when the traffic logger provides it.
``POST /v1/reload``
    Load the bundle folder now (it is also polled: manifest and heads file stat every
    ``reload_poll_s``). A bundle that fails to load is refused (409), logged and shown in
    ``/healthz``; the old one keeps serving. A new bundle is switched in between two micro-batches.

Micro-batching: requests are queued; one worker thread (the runner is not re-entrant) takes what
arrived within ``max_wait_ms`` of the oldest queued request (up to ``max_microbatch`` items), runs it
as one early-exit batch, and routes each item's answer back to its own request.

``GET /v1/monitor``
    Live agreement with the backbone on shadow-run items (overall and per exit), per-exit hit rates
    on all items, and the traffic log's state (see :mod:`selfxit.serve.monitor`); also in ``/healthz``.

Traffic log and shadow sampling: ``ServeConfig.log`` / ``--log LOG`` appends ``log_fraction`` of the
served items to a traffic log, and ``shadow_fraction`` of them also run the whole backbone after their
answer went out. A log that fails is switched off (reason in ``/healthz``) and serving goes on.

Traffic-log hook: ``create_app(..., traffic_logger=...)`` takes an object with
``on_result(item: ServedItem)`` (or a plain callable taking a ``ServedItem``). It is called on the event
loop thread for every answered item, so it must be quick (hand I/O to a queue or thread). If it also
has ``live_agreement() -> (agreement, samples) | None`` (e.g. a shadow sampler comparing early answers
with the backbone), ``/metrics`` exports ``selfxit_live_agreement`` and ``selfxit_shadow_samples``.
"""

import argparse
import asyncio
import bisect
import datetime as _dt
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from selfxit.core.bundle import MANIFEST, WEIGHTS
from selfxit.fit.conformal import prediction_sets

log = logging.getLogger("selfxit.serve.app")

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/octet-stream"}
IMAGE_FORMATS = {"JPEG", "PNG"}
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ServeConfig:
    """What to serve and the server's limits."""

    bundle: Path | None = None  # bundle folder; also watched for hot reload
    model: str | None = None  # backbone name for selfxit.zoo.load_backbone
    weights: Path | None = None
    plain: bool = False  # serve the plain backbone (the bundle's exits switched off), e.g. as a baseline
    host: str = "127.0.0.1"
    port: int = 8000
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to join its batch
    max_batch: int = 64  # items per request
    max_microbatch: int = 128  # items per early-exit run (a request is never split)
    max_queue_items: int = 4096  # queued items beyond this get 503
    max_body_bytes: int = 8 << 20  # also the WebSocket message limit
    max_image_pixels: int = 4096 * 4096
    request_timeout_s: float = 30.0
    reload_poll_s: float = 1.0  # 0 turns off watching the bundle folder
    log: str | None = None  # traffic log directory or fsspec URL (see selfxit.serve.monitor); None: no logging
    log_fraction: float = 0.1  # fraction of served items appended to the log
    shadow_fraction: float = 0.02  # fraction of served items also run through the whole backbone


@dataclass
class ServedItem:
    """One answered item, as handed to the traffic logger."""

    request_id: int
    endpoint: str  # "predict" or "stream"
    index: int  # position in its request
    prediction: int
    probability: float
    exit: str  # exit layer name, or "final"
    exit_position: int  # position in the cascade, or -1
    latency_ms: float
    bundle_generation: int
    input: torch.Tensor  # the normalised input the model saw, [C, H, W]


class TrafficLogger(Protocol):
    """Receives every answered item (see the module docstring)."""

    def on_result(self, item: ServedItem) -> None: ...


class NullTrafficLogger:
    """The default: logs nothing."""

    def on_result(self, item: ServedItem) -> None:
        pass


class ApiError(Exception):
    """A request the server refuses: HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BundleLoader:
    """Loads the backbone once; each call loads the bundle folder for it (plain: exits switched off)."""

    def __init__(self, bundle: str | Path, model: str, weights: str | Path | None = None, plain: bool = False):
        from selfxit.zoo import load_backbone
        self.bundle, self.plain = Path(bundle), plain
        self.backbone, self.info = load_backbone(model, weights)

    def __call__(self):
        import selfxit
        ee = selfxit.load(self.bundle, self.backbone)
        if self.plain:
            ee.thresholds = {}
        return ee


# ---- metrics ---------------------------------------------------------------------------------------
def _label(value: Any) -> str:
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


class _Metrics:
    """Counters and histograms, rendered in the Prometheus text format (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.exits: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.microbatches = self.microbatch_requests = self.microbatch_items = 0
        self.reloads = {"ok": 0, "refused": 0}

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + 1

    def error(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.errors[endpoint, status] = self.errors.get((endpoint, status), 0) + 1

    def item(self, exit_name: str, seconds: float) -> None:
        with self._lock:
            self.exits[exit_name] = self.exits.get(exit_name, 0) + 1
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def microbatch(self, requests: int, items: int) -> None:
        with self._lock:
            self.microbatches += 1
            self.microbatch_requests += requests
            self.microbatch_items += items

    def reload(self, ok: bool) -> None:
        with self._lock:
            self.reloads["ok" if ok else "refused"] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps name -> (help, value)."""
        lines: list[str] = []

        def family(name, kind, help_text, samples):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                         for labels, value in samples)

        with self._lock:
            family("selfxit_requests_total", "counter", "Requests (HTTP) and batches (WebSocket) received.",
                   [(f'{{endpoint="{_label(e)}"}}', n) for e, n in sorted(self.requests.items())])
            family("selfxit_errors_total", "counter", "Requests refused or failed, by status.",
                   [(f'{{endpoint="{_label(e)}",status="{s}"}}', n) for (e, s), n in sorted(self.errors.items())])
            family("selfxit_exit_items_total", "counter", "Answered items by exit taken (final = backbone).",
                   [(f'{{exit="{_label(e)}"}}', n) for e, n in sorted(self.exits.items())])
            count, cumulative = sum(self.buckets), 0
            samples = []
            for bound, n in zip(LATENCY_BUCKETS, self.buckets):
                cumulative += n
                samples.append((f'_bucket{{le="{bound:g}"}}', cumulative))
            samples += [('_bucket{le="+Inf"}', count), ("_sum", float(self.latency_sum)), ("_count", count)]
            lines.extend(["# HELP selfxit_item_latency_seconds Time from request to each item's answer.",
                          "# TYPE selfxit_item_latency_seconds histogram"])
            lines.extend(f"selfxit_item_latency_seconds{suffix} {value}" for suffix, value in samples)
            family("selfxit_microbatches_total", "counter", "Early-exit runs.", [("", self.microbatches)])
            family("selfxit_microbatch_requests_total", "counter", "Requests served by those runs.",
                   [("", self.microbatch_requests)])
            family("selfxit_microbatch_items_total", "counter", "Items in those runs.", [("", self.microbatch_items)])
            family("selfxit_reloads_total", "counter", "Bundle reload attempts by result.",
                   [(f'{{result="{r}"}}', n) for r, n in sorted(self.reloads.items())])
        for name, (help_text, value) in gauges.items():  # value: a number, or [(labels, number), ...]
            family(name, "gauge", help_text, [(labels, float(v)) for labels, v in value] if isinstance(value, list)
                   else [("", float(value))])
        return "\n".join(lines) + "\n"


# ---- micro-batching ------------------------------------------------------------------------------------
class _Job:
    """One request's items on their way through the worker."""

    def __init__(self, x: torch.Tensor, loop: asyncio.AbstractEventLoop, on_item: Callable[[dict], None],
                 request_id: int, endpoint: str, t0: float, encoded: list[tuple[bytes, str]] | None = None,
                 sets_alpha: float | None = None):
        self.x, self.loop, self.on_item, self.encoded = x, loop, on_item, encoded
        self.sets_alpha = sets_alpha  # conformal prediction sets at this alpha (None: no sets)
        self.quantiles: torch.Tensor | None = None  # per exit, set by the worker for the serving bundle
        self.request_id, self.endpoint, self.t0 = request_id, endpoint, t0
        self.done: asyncio.Future = loop.create_future()
        self.cancelled = False
        self.enqueued = time.perf_counter()
        self.generation = 0  # the bundle generation that answered it (set by the worker)


class _Served:
    """The model being served and what /healthz says about it (replaced whole on reload)."""

    def __init__(self, ee, generation: int, path: Path | None, manifest_sha256: str | None):
        self.ee, self.generation = ee, generation
        self.exit_names = list(ee.thresholds)  # exit position -> layer name
        self.version = ee.provenance.version or manifest_sha256  # recorded with logged traffic
        self.describe = {"path": str(path) if path else None, "generation": generation,
                         "exits": [{"layer": n, "threshold": t} for n, t in ee.thresholds.items()],
                         "tolerance": ee.tolerance, "manifest_sha256": manifest_sha256,
                         "loaded_at": _now()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _post(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed during shutdown
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Batcher:
    """Gathers queued jobs into micro-batches and runs them on one worker thread."""

    def __init__(self, config: ServeConfig, served: Callable[[], _Served], deliver: Callable, metrics: _Metrics,
                 monitor=None):
        self.config, self._served, self._deliver, self._metrics = config, served, deliver, metrics
        self._monitor = monitor
        self._cv = threading.Condition()
        self._pending: deque[_Job] = deque()
        self.pending_items = 0
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="selfxit-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self.pending_items + len(job.x) > self.config.max_queue_items:
                raise ApiError(503, f"server busy: {self.pending_items} items queued "
                                    f"(max_queue_items {self.config.max_queue_items}); retry later")
            self._pending.append(job)
            self.pending_items += len(job.x)
            self._cv.notify_all()

    def _take(self) -> list[_Job] | None:
        """Block until a micro-batch is ready: the oldest job waited max_wait_ms, or the batch is full."""
        wait = self.config.max_wait_ms / 1000.0
        with self._cv:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self.pending_items -= len(self._pending.popleft().x)
                if self._stop:
                    for job in self._pending:
                        _post(job.loop, _settle, job.done, ApiError(503, "server shutting down"))
                    self._pending.clear()
                    return None
                if not self._pending:
                    self._cv.wait(0.5)
                    continue
                left = self._pending[0].enqueued + wait - time.perf_counter()
                if left <= 0 or self.pending_items >= self.config.max_microbatch:
                    break
                self._cv.wait(left)
            jobs, items = [], 0
            while self._pending and (not jobs or items + len(self._pending[0].x) <= self.config.max_microbatch):
                job = self._pending.popleft()
                self.pending_items -= len(job.x)
                if not job.cancelled:
                    jobs.append(job)
                    items += len(job.x)
            return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                try:
                    self._run(jobs)
                except Exception as exc:  # never let the worker die
                    log.exception("micro-batch failed")
                    for job in jobs:
                        _post(job.loop, _settle, job.done, ApiError(500, f"inference failed: {exc}"))

    def _run(self, jobs: list[_Job]) -> None:
        served = self._served()  # the switch point for hot reload: one model per micro-batch
        ee = served.ee
        ok = []
        for job in jobs:
            try:
                ee.check_input(job.x)
                job.quantiles = None if job.sets_alpha is None else ee.set_quantiles(job.sets_alpha)
                ok.append(job)
            except (TypeError, ValueError) as exc:
                _post(job.loop, _settle, job.done, ApiError(400, str(exc)))
        if not ok:
            return
        for job in ok:
            job.generation = served.generation
        x = ok[0].x if len(ok) == 1 else torch.cat([job.x for job in ok])
        starts = [0, *itertools.accumulate(len(job.x) for job in ok[:-1])]

        def callback(result) -> None:
            k = bisect.bisect_right(starts, result.index) - 1
            job = ok[k]
            if job.cancelled:
                return
            name = "final" if result.exit < 0 else served.exit_names[result.exit]
            item = {"index": result.index - starts[k], "class": result.prediction,
                    "probability": round(result.confidence, 6), "exit": name,
                    "latency_ms": round((time.perf_counter() - job.t0) * 1000, 3)}
            if job.quantiles is not None:
                item["set"] = _prediction_set(result, job.quantiles)
            _post(job.loop, self._deliver, job, item, result.exit, served.generation)

        self._metrics.microbatch(len(ok), len(x))
        try:
            output = ee(x, callback=callback)
        except Exception as exc:
            log.exception("early-exit run failed")
            for job in ok:
                _post(job.loop, _settle, job.done, ApiError(500, f"inference failed: {exc}"))
            return
        for job in ok:
            _post(job.loop, _settle, job.done, None)
        if self._monitor is not None:  # after the answers went out: shadow runs and logging cost no latency
            encoded = [blob for job in ok for blob in (job.encoded or [None] * len(job.x))]
            try:
                self._monitor.observe(x, output, served.exit_names, ee.backbone, served.version, encoded)
            except Exception:
                log.exception("traffic monitor failed (ignored)")


def _prediction_set(result, quantiles: torch.Tensor) -> list[int]:
    """One item's conformal set as sorted class indices (the backbone's answer alone when no exit fired)."""
    sets = prediction_sets(result.probabilities[None].float(), torch.tensor([result.exit]),
                           torch.tensor([result.prediction]), quantiles)
    return torch.nonzero(sets[0]).flatten().tolist()


def _sets_alpha(value: Any, where: str) -> float | None:
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


# ---- request parsing ---------------------------------------------------------------------------------
def _json_tensor(payload: Any, max_batch: int) -> torch.Tensor:
    """``{"inputs": [...], "dtype": ...}`` -> a float tensor; shape is checked later against the model."""
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


def _decode_image(data: bytes, name: str, transform, max_pixels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    from selfxit.zoo.data import CorruptImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise ApiError(415, f"{name}: unsupported image format {img.format}; send JPEG or PNG")
            if img.width * img.height > max_pixels:
                raise ApiError(413, f"{name}: {img.width}x{img.height} pixels exceeds max_image_pixels {max_pixels}")
            rgb = img.convert("RGB")
    except ApiError:
        raise
    except UnidentifiedImageError as exc:
        raise ApiError(400, str(CorruptImageError(f"{name}: cannot decode image (not a JPEG or PNG file)"))) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, str(CorruptImageError(f"{name}: cannot decode image ({exc})"))) from exc
    return transform(rgb)


# ---- the app -----------------------------------------------------------------------------------------
def _image_type(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


def _signature(bundle: Path | None):
    """What the watcher compares: inode, mtime and size of the manifest and heads files."""
    if bundle is None:
        return None
    try:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (os.stat(bundle / f) for f in (MANIFEST, WEIGHTS)))
    except OSError:
        return None


def _manifest_sha256(bundle: Path | None) -> str | None:
    try:
        return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()[:16] if bundle else None
    except OSError:
        return None


class _CallableLogger:
    def __init__(self, fn: Callable[[ServedItem], None]):
        self.on_result = fn


def _as_logger(traffic_logger) -> TrafficLogger:
    if traffic_logger is None:
        return NullTrafficLogger()
    if hasattr(traffic_logger, "on_result"):
        return traffic_logger
    if callable(traffic_logger):
        return _CallableLogger(traffic_logger)
    raise TypeError("traffic_logger must have on_result(item) or be a callable taking a ServedItem")


def create_app(ee_loader: Callable[[], Any] | None = None, config: ServeConfig | None = None, *,
               info=None, traffic_logger: TrafficLogger | Callable[[ServedItem], None] | None = None,
               monitor=None):
    """Build the FastAPI app; the first bundle is loaded now (errors raise here).

    ``ee_loader()`` returns an EarlyExitModel and is called again on every reload; by default it is a
    :class:`BundleLoader` for ``config.bundle``/``config.model``. ``info`` (a ``ModelInfo``, default the
    loader's ``info``) gives image preprocessing; without it only tensor inputs are accepted.
    ``monitor`` (a :class:`selfxit.serve.monitor.TrafficMonitor`; by default one built from ``config.log``,
    ``config.log_fraction`` and ``config.shadow_fraction``) logs traffic and measures live agreement.
    """
    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException

    config = config or ServeConfig()
    if ee_loader is None:
        if config.bundle is None or config.model is None:
            raise ValueError("create_app needs an ee_loader, or config.bundle and config.model")
        ee_loader = BundleLoader(config.bundle, config.model, config.weights, config.plain)
    for field_name in ("max_batch", "max_microbatch", "max_queue_items", "max_body_bytes"):
        if getattr(config, field_name) < 1:
            raise ValueError(f"{field_name} must be at least 1; got {getattr(config, field_name)}")
    if config.max_wait_ms < 0 or config.request_timeout_s <= 0 or config.reload_poll_s < 0:
        raise ValueError("max_wait_ms and reload_poll_s must be >= 0 and request_timeout_s > 0")
    info = info if info is not None else getattr(ee_loader, "info", None)
    logger = _as_logger(traffic_logger)
    if monitor is None:
        from selfxit.serve.monitor import MonitorConfig, TrafficMonitor
        monitor = TrafficMonitor(MonitorConfig(config.log, config.log_fraction, config.shadow_fraction))
    bundle = Path(config.bundle) if config.bundle else None
    metrics = _Metrics()
    signature = _signature(bundle)
    state: dict[str, Any] = {
        "served": _Served(ee_loader(), 1, bundle, _manifest_sha256(bundle)),
        "seen": signature, "last_reload": None, "next_request": 0, "started": time.time(),
    }
    transform = None
    if info is not None:
        from selfxit.zoo.data import image_transform
        transform = image_transform(info)
    reload_lock = asyncio.Lock()

    def deliver(job: _Job, item: dict, exit_position: int, generation: int) -> None:
        metrics.item(item["exit"], item["latency_ms"] / 1000)
        job.on_item(item)
        try:
            logger.on_result(ServedItem(job.request_id, job.endpoint, item["index"], item["class"],
                                        item["probability"], item["exit"], exit_position, item["latency_ms"],
                                        generation, job.x[item["index"]]))
        except Exception:
            log.exception("traffic logger failed (ignored)")

    batcher = _Batcher(config, lambda: state["served"], deliver, metrics, monitor)

    async def reload(reason: str) -> dict:
        async with reload_lock:
            seen = _signature(bundle)
            sha = _manifest_sha256(bundle)
            old: _Served = state["served"]
            try:
                ee = await asyncio.to_thread(ee_loader)
                _compatible(ee, old.ee)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                state["last_reload"] = {"ok": False, "reason": reason, "at": _now(), "error": message}
                state["seen"] = seen
                metrics.reload(False)
                log.error("bundle refused (%s), still serving generation %d: %s", reason, old.generation, message)
                raise ApiError(409, f"bundle refused, still serving generation {old.generation}: {message}") from exc
            state["served"] = _Served(ee, old.generation + 1, bundle, sha)  # atomic switch
            state["last_reload"] = {"ok": True, "reason": reason, "at": _now(), "error": None}
            state["seen"] = seen
            metrics.reload(True)
            log.warning("bundle reloaded (%s): generation %d", reason, old.generation + 1)
            return state["served"].describe

    async def watch() -> None:
        candidate = None
        while True:
            await asyncio.sleep(config.reload_poll_s)
            sig = _signature(bundle)
            if sig is None or sig == state["seen"]:
                candidate = None
            elif sig != candidate:
                candidate = sig  # wait one more poll, so a bundle being copied in has settled
            else:
                candidate = None
                try:
                    await reload("bundle folder changed")
                except ApiError:
                    pass  # refused: logged and shown in /healthz
                except Exception:
                    log.exception("reload failed unexpectedly; still watching")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        watcher = asyncio.create_task(watch()) if bundle is not None and config.reload_poll_s > 0 else None
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
            await asyncio.to_thread(batcher.stop)
            await asyncio.to_thread(monitor.close)

    app = FastAPI(title="selfxit", lifespan=lifespan)
    app.state.metrics, app.state.batcher, app.state.serving = metrics, batcher, state
    app.state.monitor = monitor

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

    def next_id() -> int:
        state["next_request"] += 1
        return state["next_request"]

    async def answer(x: torch.Tensor, endpoint: str, t0: float, on_item: Callable[[dict], None],
                     request_id: int, encoded: list[tuple[bytes, str]] | None = None,
                     sets_alpha: float | None = None) -> _Job:
        """Queue ``x`` and wait until every item is answered (or the request times out)."""
        if sets_alpha is not None:  # fail fast; the worker checks again against the bundle it runs
            try:
                state["served"].ee.set_quantiles(sets_alpha)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc
        job = _Job(x, asyncio.get_running_loop(), on_item, request_id, endpoint, t0, encoded, sets_alpha)
        batcher.submit(job)
        try:
            await asyncio.wait_for(asyncio.shield(job.done), config.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(504, f"request timed out after {config.request_timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        return job

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes {config.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"body exceeds max_body_bytes {config.max_body_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    def decode_images(blobs: list[tuple[str, bytes]]) -> torch.Tensor:
        if transform is None:
            raise ApiError(415, "this server has no image preprocessing; send a JSON tensor")
        return torch.stack([_decode_image(data, name, transform, config.max_image_pixels) for name, data in blobs])

    async def parse_multipart(request: Request, body: bytes) -> tuple[torch.Tensor, list[tuple[bytes, str]]]:
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=config.max_batch + 1, max_fields=100,
                                                             max_part_size=1 << 20)
        except (MultiPartException, StarletteHTTPException) as exc:  # starlette wraps the first in the second
            detail = str(getattr(exc, "detail", exc))
            if "Too many files" in detail:
                raise ApiError(413, f"too many files: max_batch is {config.max_batch}") from exc
            raise ApiError(400, f"malformed multipart body: {detail}") from exc
        parts = form.getlist("files")
        if not parts:
            raise ApiError(400, "no images: send them as the repeated multipart file field 'files'")
        if len(parts) > config.max_batch:
            raise ApiError(413, f"batch of {len(parts)} images exceeds max_batch {config.max_batch}")
        blobs = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                raise ApiError(400, f"files[{i}] is a text field; send each image as a file upload")
            name = f"files[{i}] ({part.filename or 'unnamed'})"
            ctype = (part.content_type or "application/octet-stream").split(";")[0].strip().lower()
            if ctype not in IMAGE_TYPES:
                raise ApiError(415, f"{name}: unsupported content type {ctype!r}; send image/jpeg or image/png")
            blobs.append((name, await part.read(), ctype))
        await form.close()
        x = await asyncio.to_thread(decode_images, [(name, data) for name, data, _ in blobs])
        return x, [(data, _image_type(data)) for _, data, _ in blobs]

    async def parse_json(body: bytes) -> tuple[torch.Tensor, Any]:
        """(the tensor, the body's "sets" value or None)."""
        def parse():
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"body is not valid JSON: {exc}") from exc
            return _json_tensor(payload, config.max_batch), payload.get("sets")

        return await asyncio.to_thread(parse)

    def check_shape(x: torch.Tensor) -> None:
        if len(x) > config.max_batch:
            raise ApiError(413, f"batch of {len(x)} items exceeds max_batch {config.max_batch}")
        try:
            state["served"].ee.check_input(x)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc

    @app.post("/v1/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        metrics.request("predict")
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in ("multipart/form-data", "application/json"):
                raise ApiError(415, f"unsupported content type {ctype or 'none'!r}; send multipart/form-data "
                                    "(images in field 'files') or application/json {\"inputs\": [...]}")
            sets_alpha = _sets_alpha(request.query_params.get("sets"), "query parameter 'sets'")
            body = await read_body(request)
            encoded = None
            if ctype == "multipart/form-data":
                x, encoded = await parse_multipart(request, body)
            else:
                x, body_sets = await parse_json(body)
                sets_alpha = _sets_alpha(body_sets, "'sets'") if body_sets is not None else sets_alpha
            check_shape(x)
            items: list[dict] = []
            request_id = next_id()
            job = await answer(x, "predict", t0, items.append, request_id, encoded, sets_alpha)
        except ApiError as exc:
            metrics.error("predict", exc.status)
            raise
        items.sort(key=lambda item: item["index"])
        return {"request_id": request_id, "bundle": job.generation, "items": items}

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        await websocket.accept()
        batch = 0
        try:
            connection_sets = _sets_alpha(websocket.query_params.get("sets"), "query parameter 'sets'")
        except ApiError as exc:
            await websocket.send_json({"type": "error", "batch": None, "id": None, "status": exc.status,
                                       "error": exc.message})
            await websocket.close(code=1008)
            return
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                t0 = time.perf_counter()
                metrics.request("stream")
                tag = None
                encoded = None
                sets_alpha = connection_sets
                queue: asyncio.Queue = asyncio.Queue()
                try:
                    if message.get("bytes") is not None:
                        x = await asyncio.to_thread(decode_images, [("image", message["bytes"])])
                        encoded = [(message["bytes"], _image_type(message["bytes"]))]
                    else:
                        try:
                            payload = json.loads(message.get("text") or "")
                        except json.JSONDecodeError as exc:
                            raise ApiError(400, f"message is not valid JSON: {exc}") from exc
                        tag = payload.get("id") if isinstance(payload, dict) else None
                        x = await asyncio.to_thread(_json_tensor, payload, config.max_batch)
                        if payload.get("sets") is not None:
                            sets_alpha = _sets_alpha(payload["sets"], "'sets'")
                    check_shape(x)
                    sender = asyncio.create_task(_forward(websocket, queue, batch, tag))
                    try:
                        job = await answer(x, "stream", t0, queue.put_nowait, next_id(), encoded, sets_alpha)
                    finally:
                        queue.put_nowait(None)
                        await sender
                    await websocket.send_json({"type": "done", "batch": batch, "id": tag, "items": len(x),
                                               "bundle": job.generation,
                                               "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
                except ApiError as exc:
                    metrics.error("stream", exc.status)
                    await websocket.send_json({"type": "error", "batch": batch, "id": tag, "status": exc.status,
                                               "error": exc.message})
                batch += 1
        except WebSocketDisconnect:
            return
        except Exception:  # the client went away mid-batch, or the socket failed: drop this connection only
            log.debug("websocket closed", exc_info=True)

    @app.get("/healthz")
    async def healthz():
        last = state["last_reload"]
        return {"status": "degraded" if last and not last["ok"] else "ok", "plain": config.plain,
                "bundle": state["served"].describe, "last_reload": last, "queue_items": batcher.pending_items,
                "uptime_s": round(time.time() - state["started"], 1), "monitor": monitor.snapshot()}

    @app.get("/v1/monitor")
    async def monitor_view():
        """Live agreement with the backbone (shadow-run items), per-exit hit rates and agreement, logging."""
        return monitor.snapshot()

    @app.get("/metrics")
    async def metrics_text():
        gauges = {"selfxit_queue_items": ("Items waiting for the worker.", batcher.pending_items),
                  "selfxit_bundle_generation": ("Bundle generation being served (1 = first).",
                                                state["served"].generation)}
        live = getattr(logger, "live_agreement", None)
        value = live() if callable(live) else monitor.live_agreement()
        snapshot = monitor.snapshot()
        gauges["selfxit_exit_hit_rate"] = ("Fraction of served items answered at each exit.",
                                           [(f'{{exit="{_label(n)}"}}', r) for n, r in sorted(snapshot["hit_rates"].items())])
        gauges["selfxit_exit_live_agreement"] = (
            "Shadow-sampled agreement with the backbone of items answered at each exit.",
            [(f'{{exit="{_label(n)}"}}', e["agreement"]) for n, e in sorted(snapshot["exit_agreement"].items())])
        gauges["selfxit_traffic_logged_items"] = ("Items appended to the traffic log.", snapshot["logging"]["logged"])
        gauges["selfxit_traffic_log_enabled"] = ("1 while traffic logging works, 0 when off or failed.",
                                                 int(snapshot["logging"]["enabled"]))
        if value is not None:
            agreement, samples = value
            gauges["selfxit_live_agreement"] = ("Shadow-sampled agreement of served answers with the backbone.",
                                                agreement)
            gauges["selfxit_shadow_samples"] = ("Items the live agreement is measured on.", samples)
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/reload")
    async def reload_now():
        return {"reloaded": True, "bundle": await reload("POST /v1/reload")}

    return app


async def _forward(websocket, queue: asyncio.Queue, batch: int, tag) -> None:
    """Send each item's result to the client as it arrives; ``None`` ends the batch."""
    while (item := await queue.get()) is not None:
        await websocket.send_json({"type": "result", "batch": batch, "id": tag, **item})


def _compatible(new, old) -> None:
    """Refuse a bundle the running server cannot switch to."""
    if tuple(new.input_shape) != tuple(old.input_shape) or new.num_classes != old.num_classes:
        raise ValueError(f"bundle takes input {list(new.input_shape)} with {new.num_classes} classes; the server "
                         f"serves {list(old.input_shape)} with {old.num_classes}")
    modules = dict(new.backbone.named_modules())
    missing = [name for name in new.thresholds if name not in modules]
    if missing:
        raise ValueError(f"exit layers {missing} are not modules of the backbone")


# ---- command line ------------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``selfxit serve`` on an argparse subparsers object."""
    d = ServeConfig()
    p = subparsers.add_parser("serve", help="serve a bundle over HTTP and WebSocket (micro-batching, hot reload)")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (watched for changes)")
    p.add_argument("--model", required=True, help="backbone name, as for enable")
    p.add_argument("--weights", type=Path, help="checkpoint file (state dict) for the model")
    p.add_argument("--plain", action="store_true", help="serve the plain backbone (exits off), e.g. as a baseline")
    p.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="micro-batching window")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="items per request")
    p.add_argument("--max-microbatch", type=int, default=d.max_microbatch, help="items per early-exit run")
    p.add_argument("--max-queue-items", type=int, default=d.max_queue_items)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--timeout-s", type=float, default=d.request_timeout_s, help="request timeout")
    p.add_argument("--reload-poll-s", type=float, default=d.reload_poll_s, help="bundle polling period; 0: off")
    p.add_argument("--log", help="traffic log folder or fsspec URL to append sampled traffic to (default: none)")
    p.add_argument("--log-fraction", type=float, default=d.log_fraction, help="fraction of items logged")
    p.add_argument("--shadow-fraction", type=float, default=d.shadow_fraction,
                   help="fraction of items also run through the whole backbone to measure live agreement")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)
    return p


def config_from_args(args) -> ServeConfig:
    """A ServeConfig from the parsed ``serve`` arguments."""
    return ServeConfig(bundle=args.bundle, model=args.model, weights=args.weights, plain=args.plain,
                       host=args.host, port=args.port, max_wait_ms=args.max_wait_ms, max_batch=args.max_batch,
                       max_microbatch=args.max_microbatch, max_queue_items=args.max_queue_items,
                       max_body_bytes=args.max_body_bytes, request_timeout_s=args.timeout_s,
                       reload_poll_s=args.reload_poll_s, log=args.log, log_fraction=args.log_fraction,
                       shadow_fraction=args.shadow_fraction)


def serve(args) -> None:
    """Run the server until interrupted."""
    import uvicorn
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if not loopback:
        log.warning("binding %s: the server (including POST /v1/reload) is reachable beyond this machine",
                    config.host)
    app = create_app(None, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level,
                ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    import sys

    from selfxit.cli import _quiet_libraries
    _quiet_libraries()
    parser = argparse.ArgumentParser(prog="python -m selfxit.serve.app")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:]
    parsed = parser.parse_args(argv if argv[:1] == ["serve"] else ["serve", *argv])
    try:
        parsed.func(parsed)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"selfxit: error: {exc}", file=sys.stderr)
        sys.exit(2)
