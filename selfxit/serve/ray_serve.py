"""The early-exit model as a Ray Serve deployment: replicas behind one endpoint, following a bundle store.

``ray_app(bundle_store, model)`` returns a Ray Serve application (``serve.run(ray_app(...))``, or bind it into
your own); ``selfxit serve --ray`` runs it. Each replica serves the HTTP API of ``selfxit serve`` (a FastAPI
ingress): ``POST /v1/predict``, ``WebSocket /v1/stream``, ``GET /healthz``, ``GET /metrics``,
``GET /v1/monitor`` and ``POST /v1/reload``. Requests are parsed and checked by :mod:`selfxit.serve.requests`,
with the same limits, 4xx answers and JSON errors (:mod:`selfxit.serve.guard`); each item's answer is
:func:`selfxit.serve.batching.answer_item`.

Differences from ``selfxit serve``, and why:

- Micro-batching is Ray Serve's ``@serve.batch``: it gathers up to ``max_batch_size`` *requests* (not items)
  for ``batch_wait_timeout_s``. Admission is Ray Serve's ``max_queued_requests`` (503 beyond it).
- ``/v1/stream`` answers each message's items once its whole batch has run (a result message per item, then
  ``done``), not the moment each exit fires: a ``@serve.batch`` call returns once per batch.
- Bundles: a replica follows the store's ``current`` (polled every ``poll_s``) or the version pinned by the
  deployment's ``user_config``; a change of ``user_config`` reaches every replica through ``reconfigure``
  without restarting it. A new bundle is copied in, loaded and warmed up off the event loop and switched in
  between two batches, so no request in flight fails; one that does not load (or does not fit the backbone)
  is refused there and that replica keeps serving the old one (``/healthz``: ``degraded``). A store that
  cannot be read makes the replica report ``unhealthy`` while it goes on serving what it has.
- ``/healthz``, ``/v1/monitor`` and ``/metrics`` cover every replica through the board actor
  (:mod:`selfxit.serve.ray_state`): the version each replica serves, and live agreement and hit rates from
  shadow sampling summed over replicas. Each replica logs sampled traffic to its own shard of one traffic log.

No ``from __future__ import annotations`` here: Ray Serve rebuilds the route methods' signatures for FastAPI,
which must see ``Request`` and ``WebSocket`` as classes, not strings.
"""
import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from selfxit.extras import require_extra

require_extra("ray", "selfxit serve --ray")
require_extra("serve", "selfxit serve --ray")
import torch  # noqa: E402
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from ray import serve  # noqa: E402

from selfxit.serve import requests as rq  # noqa: E402
from selfxit.serve.batching import TraceGate, warm_up  # noqa: E402
from selfxit.serve.config import ServeConfig  # noqa: E402
from selfxit.serve.guard import Lifecycle, RequestGuard, SafeJSONResponse, add_error_handlers  # noqa: E402
from selfxit.serve.metrics import CONTENT_TYPE, ServeMetrics  # noqa: E402
from selfxit.serve.monitor import MonitorConfig, TrafficMonitor  # noqa: E402
from selfxit.serve.ray_batch import RayJob, run_jobs  # noqa: E402
from selfxit.serve.ray_config import RayServeConfig  # noqa: E402
from selfxit.serve.ray_state import BundleSource, aggregate, fresh, get_board, metrics_text  # noqa: E402
from selfxit.serve.reload import Reloader  # noqa: E402
from selfxit.serve.requests import ApiError  # noqa: E402
from selfxit.serve.schema import StreamMessage  # noqa: E402
from selfxit.serve.stream import message_id, ws_error, ws_send  # noqa: E402

REPORT_S = 1.0  # how often a replica reports to the board
api = FastAPI(title="selfxit (Ray Serve)", default_response_class=SafeJSONResponse)
add_error_handlers(api)
LIFECYCLE = Lifecycle()  # one per replica process: request ids and requests in flight
api.add_middleware(RequestGuard, lifecycle=LIFECYCLE)


@serve.deployment
@serve.ingress(api)
class EarlyExitReplica:
    """One replica: the backbone, the bundle it serves, its monitor, and the routes."""

    def __init__(self, location: str, model: Any, weights: str | None, config: ServeConfig, app_name: str,
                 threads: int = 1):
        from selfxit.zoo import load_backbone
        from selfxit.zoo.data import image_transform
        torch.set_num_threads(threads)
        self.config, self.limits = config, rq.RequestLimits.of(config)
        if isinstance(model, str):
            self.backbone, info = load_backbone(model, weights)
        else:
            self.backbone, info = model
        self.transform = image_transform(info) if info is not None else None
        self.source = BundleSource(location)
        self.version: str | None = None
        self.poll_s = 1.0
        self.store_error: str | None = None
        self.refused: str | None = None  # digest of the last refused bundle: not retried every poll
        self.gate, self.metrics = TraceGate(), ServeMetrics()
        self.monitor = TrafficMonitor(MonitorConfig(config.log, config.log_fraction, config.shadow_fraction))
        self.after = ThreadPoolExecutor(1, thread_name_prefix="selfxit-monitor")  # shadow runs, after answers
        # one model call at a time: the exits are forward hooks on the backbone, so a shadow pass of the backbone
        # while an early-exit run is in flight would fire them (the single server runs both on its one worker)
        self.model_lock = threading.Lock()
        self.reloader = Reloader(self._load, None, self.metrics.reload, lambda ee: warm_up(ee, self.gate))
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.board = get_board(app_name)
        self.started, self.watcher = time.time(), None

    # ---- bundles ------------------------------------------------------------------------------------
    def _load(self):
        """Copy the followed bundle in, load it for the backbone (raises: Reloader refuses it)."""
        import selfxit
        local, digest = self.source.fetch(self.version)
        try:
            ee = selfxit.load(local, self.backbone)
        finally:
            BundleSource.discard(local)
        if self.config.plain:
            ee.thresholds = {}
        ee.bundle_digest = digest
        return ee

    async def check(self, reason: str) -> dict:
        """Reload if the followed bundle changed since the one served (or refused last)."""
        try:
            digest = await asyncio.to_thread(self.source.digest, self.version)
            self.store_error = None
        except Exception as exc:  # unreadable store: report unhealthy, go on serving what is loaded
            self.store_error = f"{type(exc).__name__}: {exc}"
            return self.bundle_state()
        if digest in (getattr(self.reloader.served.ee, "bundle_digest", None), self.refused):
            return self.bundle_state()
        try:
            await self.reloader.reload(reason)
            self.refused = None
        except ApiError:
            self.refused = digest  # logged and in last_reload; the old bundle keeps serving
        self.report()
        return self.bundle_state()

    async def reconfigure(self, user_config: dict) -> None:
        """Ray Serve's in-place update: pin or follow a version, batching settings (see RayServeConfig)."""
        unknown = set(user_config) - set(RayServeConfig().user_config())
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; known: {sorted(RayServeConfig().user_config())}")
        batch = int(user_config.get("max_batch_size", 8))
        self.infer.set_max_batch_size(batch)
        self.infer.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))
        self.poll_s = float(user_config.get("poll_s", 1.0))
        version = user_config.get("version")
        if version != self.version:
            self.version = version
            await self.check(f"user_config: version {version or 'current'}")
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())
        self.report()

    async def watch(self) -> None:
        """Report to the board every REPORT_S; look at the store every poll_s (0: only on reconfigure)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(REPORT_S, self.poll_s) if self.poll_s > 0 else REPORT_S)
            if self.poll_s > 0 and time.monotonic() - last >= self.poll_s:
                last = time.monotonic()
                try:
                    await self.check("bundle store changed")
                except Exception:  # never let the watcher die
                    pass
            self.report()

    def status(self) -> str:
        if self.store_error:
            return "unhealthy"
        return "degraded" if self.reloader.degraded else "ok"

    def bundle_state(self) -> dict:
        served = self.reloader.served
        return {**served.describe, "path": self.source.folder(self.version), "version": served.version,
                "manifest_sha256": getattr(served.ee, "bundle_digest", None), "pinned": self.version}

    def state(self) -> dict:
        """What this replica reports to the board."""
        return {"pid": os.getpid(), "status": self.status(), "bundle": self.bundle_state(),
                "last_reload": self.reloader.last_reload, "store_error": self.store_error,
                "counts": self.monitor.counts(), "families": list(self.metrics.registry.collect()),
                "in_flight": LIFECYCLE.in_flight, "uptime_s": round(time.time() - self.started, 1)}

    def report(self) -> None:
        try:
            self.board.report.remote(self.replica, self.state())
        except Exception:  # the board is gone (shutting down): nothing to report to
            pass

    async def entries(self) -> dict:
        """Every replica's last report, this one's fresh."""
        try:
            entries = dict(await self.board.entries_now.remote())
        except Exception:
            entries = {}
        entries[self.replica] = {**self.state(), "replica": self.replica, "reported_at": time.time()}
        return fresh(entries)

    # ---- inference ----------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer(self, jobs: list[RayJob]) -> list:
        """One early-exit run for the requests Ray Serve gathered; per request its items or an ApiError."""
        served = self.reloader.served  # the switch point: one bundle per batch
        return await asyncio.to_thread(self._run, jobs, served)

    def _run(self, jobs: list[RayJob], served) -> list:
        results, x, output, encoded = run_jobs(jobs, served, self.gate, self.model_lock, self.metrics)
        if output is not None:  # the answers are out once this returns: shadow runs and logging come after
            self.after.submit(self._observe, x, output, served, encoded)
        return results

    def _observe(self, x, output, served, encoded) -> None:
        with self.model_lock, self.gate.shared():
            try:
                self.monitor.observe(x, output, served.exit_names, served.ee.backbone, served.version, encoded,
                                     ee=served.ee)
            except Exception:
                pass  # the monitor never fails a request (its log switches itself off on errors)

    async def answer(self, job: RayJob, endpoint: str) -> list[dict]:
        """Queue one request's items on ``@serve.batch``; its items, or the ApiError of the batch."""
        rq.check_batch(job.x, self.limits.max_batch, self.reloader.served.ee)
        self.check_alpha(job.sets_alpha)
        try:
            result = await asyncio.wait_for(self.infer(job), self.config.request_timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 (not TimeoutError before 3.11)
            raise ApiError(504, f"request timed out after {self.config.request_timeout_s:g} s") from None
        if isinstance(result, ApiError):
            raise result
        return result

    def _decode(self, blobs):
        with self.gate.shared():
            return rq.decode_images(blobs, self.transform, self.limits.max_image_pixels, self.limits.max_request_pixels)

    # the decoder selfxit serve's request reader (requests.predict_input) is handed
    async def decode(self, blobs: list[tuple[str, bytes]]):
        x = await asyncio.to_thread(self._decode, blobs)
        return x, [(data, rq.image_type(data)) for _, data in blobs]

    def check_alpha(self, alpha: float | None) -> None:
        if alpha is not None:
            try:
                self.reloader.served.ee.set_quantiles(alpha)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from exc

    # ---- routes -------------------------------------------------------------------------------------
    @api.post("/v1/predict")
    async def predict(self, request: Request):
        t0 = time.perf_counter()
        self.metrics.request("predict")
        rid = (request.scope.get("state") or {}).get("request_id")
        try:  # the body is read by selfxit serve's own code, so the two front ends cannot drift apart
            x, encoded, alpha = await rq.predict_input(request, self.limits, self.decode, self.check_alpha)
            items = await self.answer(RayJob(x, t0, encoded, alpha), "predict")
        except ApiError as exc:
            self.metrics.error("predict", exc.status)
            raise
        return {"request_id": rid, "replica": self.replica, "bundle": self.reloader.served.generation,
                "version": self.reloader.served.version, "items": items}

    @api.websocket("/v1/stream")
    async def stream(self, websocket: WebSocket):
        await websocket.accept()
        try:
            connection_alpha = rq.sets_alpha(websocket.query_params.get("sets"), "query parameter 'sets'")
        except ApiError as exc:
            await ws_error(websocket, None, None, exc, None)
            await websocket.close(code=1008)
            return
        batch = 0
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._stream_batch(websocket, message, batch, connection_alpha)
                batch += 1
        except WebSocketDisconnect:
            return

    async def _stream_batch(self, websocket: WebSocket, message: dict, batch: int, alpha: float | None) -> None:
        t0, tag, rid = time.perf_counter(), None, LIFECYCLE.next_id()
        self.metrics.request("stream")
        try:
            if message.get("bytes") is not None:
                if len(message["bytes"]) > self.limits.max_body_bytes:
                    raise ApiError(413, f"message exceeds max_body_bytes {self.limits.max_body_bytes}")
                blobs = [("image", message["bytes"])]
                job = RayJob(await asyncio.to_thread(self._decode, blobs), t0,
                             [(message["bytes"], rq.image_type(message["bytes"]))], alpha)
            else:
                text = message.get("text") or ""
                if len(text) > self.limits.max_body_bytes:
                    raise ApiError(413, f"message exceeds max_body_bytes {self.limits.max_body_bytes}")
                try:
                    x, parsed = await asyncio.to_thread(rq.parse_tensor_json, text, self.limits.max_batch,
                                                        StreamMessage, "message")
                except ApiError:
                    tag = await asyncio.to_thread(message_id, text)
                    raise
                tag = parsed.id
                job = RayJob(x, t0, None, parsed.sets if parsed.sets is not None else alpha)
            items = await self.answer(job, "stream")
            for item in items:
                await ws_send(websocket, {"type": "result", "batch": batch, "id": tag, **item})
            await ws_send(websocket, {"type": "done", "batch": batch, "id": tag, "items": len(items),
                                      "bundle": self.reloader.served.generation, "replica": self.replica,
                                      "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
        except ApiError as exc:
            self.metrics.error("stream", exc.status)
            await ws_error(websocket, batch, tag, exc, rid)

    @api.get("/healthz")
    async def healthz(self):
        entries = await self.entries()
        return {"status": self.status(), "replica": self.replica, "pid": os.getpid(), "bundle": self.bundle_state(),
                "last_reload": self.reloader.last_reload, "store": {"location": self.source.location,
                                                                   "error": self.store_error},
                "versions": {rid: e["bundle"]["version"] for rid, e in entries.items() if not e["stale"]},
                "replicas": {rid: {"status": e["status"], "version": e["bundle"]["version"],
                                   "generation": e["bundle"]["generation"], "age_s": e["age_s"],
                                   "stale": e["stale"], "store_error": e["store_error"]}
                             for rid, e in entries.items()},
                "monitor": aggregate(entries)}

    @api.get("/v1/monitor")
    async def monitor_view(self):
        return aggregate(await self.entries())

    @api.get("/metrics")
    async def metrics_view(self):
        return Response(metrics_text(await self.entries()), media_type=CONTENT_TYPE)

    @api.post("/v1/reload")
    async def reload_now(self, request: Request):
        """Look at the bundle now, on this replica (the others look within ``poll_s``)."""
        rq.check_admin(request, self.config.admin_token)
        state = await self.check("POST /v1/reload")
        if self.reloader.degraded:
            raise ApiError(409, f"bundle refused, still serving generation {state['generation']}: "
                                f"{self.reloader.last_reload['error']}")
        return {"reloaded": True, "bundle": state}

    def __del__(self):
        """Ray Serve's graceful shutdown of a replica (scale-down, redeploy): leave the board, flush the log."""
        for step in (lambda: self.board.drop.remote(self.replica), self.monitor.close):
            try:
                step()
            except Exception:
                pass


def ray_app(bundle_store: str | Path, model: Any, weights: str | Path | None = None,
            config: ServeConfig | None = None, ray_config: RayServeConfig | None = None, info=None):
    """A Ray Serve application of the early-exit model, to ``serve.run`` or to bind into your own app.

    ``bundle_store`` is a bundle store (followed through ``current``) or one bundle folder, local or any fsspec
    URL every replica can read. ``model`` is a backbone name for :func:`selfxit.zoo.load_backbone` (each
    replica loads it, with ``weights``) or an ``nn.Module`` (shipped to the replicas; give ``info``, its
    ``ModelInfo``, for image uploads). ``config`` holds the request limits and monitoring of ``selfxit serve``;
    ``ray_config`` the replicas, autoscaling and batching. Needs a running Ray (``ray.init``) and creates the
    board actor the replicas report to.
    """
    config = config or ServeConfig()
    ray_config = ray_config or RayServeConfig()
    config.validate()
    ray_config.validate()
    try:  # here, before any replica tries (and Ray Serve retries) to start on a bundle nobody can read
        BundleSource(bundle_store).digest(ray_config.version)
    except Exception as exc:
        raise ValueError(f"cannot read a bundle at {bundle_store}"
                         f"{f' version {ray_config.version}' if ray_config.version else ''}: "
                         f"{type(exc).__name__}: {exc}") from None
    get_board(ray_config.app_name, create=True)
    target = model if isinstance(model, str) else (model, info)
    deployment = EarlyExitReplica.options(name="selfxit", **ray_config.deployment_options())
    return deployment.bind(str(bundle_store), target, None if weights is None else str(weights), config,
                           ray_config.app_name, ray_config.threads)
