"""Micro-batching: concurrent requests share one early-exit run on a single worker thread.

Requests are queued as :class:`Job` s. The worker (the runner is not re-entrant, so there is exactly one)
takes what arrived within ``max_wait_ms`` of the oldest queued job, up to ``max_microbatch`` items
(a request is never split), runs it as one early-exit batch, and routes each item's answer back to
its own request on that request's event loop the moment its exit fires. After the answers have gone
out, the traffic monitor sees the batch (shadow runs and logging add no latency).

Admission is bounded by expected wait, not only by item count: the worker keeps a moving average of
its time per item (whole micro-batch, monitor included, divided by its items), and a request that would
wait longer than ``max_queue_wait_ms`` behind what is queued and running is refused at once with 503 and
``Retry-After`` — unless nothing is queued: then it runs next, whatever the batch in progress costs (a lone
client is never turned away because the guard raised the shadow fraction). Why: under overload a count limit alone lets every request wait out its timeout, so
clients see slow failures instead of a fast, retryable answer; the average adapts to the model and the
machine, which a fixed item count cannot.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from selfxit.core.conformal import prediction_sets
from selfxit.serve.metrics import ServeMetrics
from selfxit.serve.reload import Served
from selfxit.serve.requests import ApiError, busy

log = logging.getLogger("selfxit.serve.app")  # the server logs under one name, as before the split


class Job:
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
        self.error: ApiError | None = None  # set by the worker when an item cannot be answered


def post(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on ``loop`` from the worker thread (ignored once the loop has closed)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed during shutdown
        pass


def settle(future: asyncio.Future, error: BaseException | None) -> None:
    """Finish a job's future (on its loop), unless it already is (timed out, cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def prediction_set(result, quantiles: torch.Tensor) -> list[int]:
    """One item's conformal set as sorted class indices (the backbone's answer alone when no exit fired)."""
    sets = prediction_sets(result.probabilities[None].float(), torch.tensor([result.exit]),
                           torch.tensor([result.prediction]), quantiles)
    return torch.nonzero(sets[0]).flatten().tolist()


def answer_item(result, index: int, exit_names: list[str], t0: float, quantiles: torch.Tensor | None) -> dict:
    """One item's answer as every front end sends it (class, probability, exit name, latency since ``t0``, and
    its conformal set when ``quantiles`` are given); the selfxit server and the Ray Serve replicas share it."""
    item = {"index": index, "class": result.prediction, "probability": round(result.confidence, 6),
            "exit": "final" if result.exit < 0 else exit_names[result.exit],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}
    if quantiles is not None:
        item["set"] = prediction_set(result, quantiles)
    return item


class TraceGate:
    """Keeps torch.fx tracing apart from every other module call in the process (a readers-writer lock).

    Why: while torch.fx traces a model it patches ``torch.nn.Module.__call__`` for the whole process, so a
    module called from another thread meanwhile (the torchvision transform decoding an upload, or the
    worker's run while a reloaded bundle warms up) fails with "NameError: module is not installed as a
    submodule". An early-exit runner traces its backbone when it is built: on a bundle's first run and
    after its exits change. Decodes and the worker's runs hold the gate shared (they run together); a run
    that builds a runner, and the warm-up of a new bundle, hold it alone. A waiting builder blocks new
    shared holders, so a steady stream of uploads cannot starve it.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            self._cv.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._writers_waiting += 1
            self._cv.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cv:
                self._writing = False
                self._cv.notify_all()


def builds_runner(ee) -> bool:
    """True when the next call of ``ee`` builds its runner (and so traces the backbone with torch.fx)."""
    return getattr(ee, "_runner", False) is None


def warm_up(ee, gate: TraceGate) -> None:
    """Run ``ee`` once on zeros, alone, so its runner is built before it serves (a new bundle's first request
    then costs no tracing, and a bundle that cannot run is refused at load). Two rows, not one: a batch of
    two or more also measures the backbone's batch-invariant size (:mod:`selfxit.core.exactness`), which the
    first micro-batch would otherwise pay for."""
    with gate.exclusive(), torch.inference_mode():
        ee(torch.zeros(2, *ee.input_shape))
        if hasattr(ee, "warm"):
            ee.warm()  # the bucketed runtime compiles / captures every bucket before the bundle serves


def runtime_status(ee) -> dict:
    """What /healthz says about the runtime: engine, compile mode, device, the ladder and the buckets warmed."""
    runtime = getattr(ee, "runtime", None)
    if runtime is None:
        return {}
    return {"engine": runtime.engine, "compile": runtime.compile, "device": str(ee.device),
            "buckets": list(runtime.buckets or ()) if runtime.engine == "buckets" else [],
            "warm_buckets": ee.warm_buckets}


def _on_host(output):
    """``output`` with its tensors on the CPU (the monitor and the traffic log read them as numbers)."""
    import dataclasses
    return dataclasses.replace(output, **{f.name: getattr(output, f.name).cpu() for f in dataclasses.fields(output)
                                          if isinstance(getattr(output, f.name), torch.Tensor)})


# deliver(job, item, exit_position, generation), called on the job's loop for each answered item
Deliver = Callable[[Job, dict, int, int], None]


class Batcher:
    """Gathers queued jobs into micro-batches and runs them on one worker thread.

    ``config`` needs ``max_wait_ms``, ``max_microbatch`` and ``max_queue_items``; ``served()`` returns the
    bundle to run (read once per micro-batch: the hot-reload switch point).
    """

    def __init__(self, config, served: Callable[[], Served], deliver: Deliver, metrics: ServeMetrics,
                 monitor=None, gate: TraceGate | None = None):
        self.config, self._served, self._deliver, self._metrics = config, served, deliver, metrics
        self._monitor = monitor
        self.gate = gate or TraceGate()
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self.pending_items = 0
        self.running_items = 0  # items in the micro-batch being run
        self.item_s = 0.0  # moving average of the worker's seconds per item (0 until the first batch)
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="selfxit-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse what is still queued (503) and wait for the worker to finish its batch."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def expected_wait_s(self) -> float:
        """How long a request queued now would wait for the worker: items ahead x average seconds per item."""
        return (self.pending_items + self.running_items) * self.item_s

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it (503 + Retry-After) when the queue is full or the expected wait too long."""
        with self._cv:
            wait = self.expected_wait_s()
            if self.pending_items + len(job.x) > self.config.max_queue_items:
                raise busy(f"server busy: {self.pending_items} items queued "
                           f"(max_queue_items {self.config.max_queue_items})", wait)
            limit_ms = self.config.max_queue_wait_ms
            # With nothing queued the request runs next: it waits out at most the batch in progress (whose
            # answers may already be out while its shadow passes run), so it is never refused for that.
            if self.pending_items and wait * 1000 > limit_ms:
                raise busy(f"server busy: expected queue wait {wait * 1000:.0f} ms exceeds max_queue_wait_ms "
                           f"{limit_ms:g} ({self.pending_items + self.running_items} items ahead at "
                           f"{self.item_s * 1000:.2f} ms each)", wait)
            self._pending.append(job)
            self.pending_items += len(job.x)
            self._cv.notify_all()

    def _take(self) -> list[Job] | None:
        """Block until a micro-batch is ready: the oldest job waited max_wait_ms, or the batch is full."""
        wait = self.config.max_wait_ms / 1000.0
        with self._cv:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self.pending_items -= len(self._pending.popleft().x)
                if self._stop:
                    for job in self._pending:
                        post(job.loop, settle, job.done, busy("server shutting down", 1))
                    self._pending.clear()
                    return None
                if not self._pending:
                    self._cv.wait(0.5)
                    continue
                left = self._pending[0].enqueued + wait - time.perf_counter()
                if left <= 0 or self.pending_items >= self.config.max_microbatch:
                    break
                self._cv.wait(left)
            jobs: list[Job] = []
            items = 0
            while self._pending and (not jobs or items + len(self._pending[0].x) <= self.config.max_microbatch):
                job = self._pending.popleft()
                self.pending_items -= len(job.x)
                if not job.cancelled:
                    jobs.append(job)
                    items += len(job.x)
            self.running_items = items
            return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                start = time.perf_counter()
                served = self._served()  # the switch point for hot reload: one model per micro-batch
                try:  # the run calls torch modules: alone when it builds a runner (tracing), else beside decodes
                    with self.gate.exclusive() if builds_runner(served.ee) else self.gate.shared():
                        self._run(jobs, served)
                except Exception as exc:  # never let the worker die
                    log.exception("micro-batch failed")
                    for job in jobs:
                        post(job.loop, settle, job.done, ApiError(500, f"inference failed: {exc}"))
                self._timed(time.perf_counter() - start, sum(len(job.x) for job in jobs))

    def _timed(self, seconds: float, items: int) -> None:
        """Fold one micro-batch into the moving average of seconds per item (weight 0.2: about 5 batches)."""
        with self._cv:
            self.running_items = 0
            if items:
                per_item = seconds / items
                self.item_s = per_item if self.item_s == 0 else 0.8 * self.item_s + 0.2 * per_item

    def _accept(self, jobs: list[Job], served: Served) -> list[Job]:
        """The jobs the bundle about to run can answer (it may have been switched since they were checked)."""
        ok = []
        for job in jobs:
            try:
                served.ee.check_input(job.x)
                job.quantiles = None if job.sets_alpha is None else served.ee.set_quantiles(job.sets_alpha)
                job.generation = served.generation
                ok.append(job)
            except (TypeError, ValueError) as exc:
                post(job.loop, settle, job.done, ApiError(400, str(exc)))
        return ok

    def _run(self, jobs: list[Job], served: Served) -> None:
        ee = served.ee
        ok = self._accept(jobs, served)
        if not ok:
            return
        x = ok[0].x if len(ok) == 1 else torch.cat([job.x for job in ok])
        starts = [0, *itertools.accumulate(len(job.x) for job in ok[:-1])]

        def callback(result) -> None:
            k = bisect.bisect_right(starts, result.index) - 1
            job = ok[k]
            if job.cancelled or job.error is not None:
                return
            if not math.isfinite(result.confidence):  # never write NaN/inf into an answer (nor log it)
                job.error = ApiError(422, f"the model's output for item {result.index - starts[k]} is not finite "
                                          "(NaN or infinity): the input is outside what the model can answer")
                return
            item = answer_item(result, result.index - starts[k], served.exit_names, job.t0, job.quantiles)
            post(job.loop, self._deliver, job, item, result.exit, served.generation)

        self._metrics.microbatch(len(ok), len(x))
        try:
            output = ee(x, callback=callback)
        except Exception as exc:
            log.exception("early-exit run failed")
            for job in ok:
                post(job.loop, settle, job.done, ApiError(500, f"inference failed: {exc}"))
            return
        for job in ok:
            post(job.loop, settle, job.done, job.error)
        if self._monitor is not None:  # after the answers went out: shadow runs and logging cost no latency
            encoded: list[tuple[bytes, str] | None] = []
            for job in ok:
                encoded.extend(job.encoded if job.encoded else [None] * len(job.x))
            try:
                on_device = getattr(ee, "device", x.device)
                backbone = ee.backbone if on_device == x.device else (lambda b: ee.backbone(b.to(on_device)).cpu())
                self._monitor.observe(x, _on_host(output), served.exit_names, backbone, served.version, encoded, ee=ee)
            except Exception:
                log.exception("traffic monitor failed (ignored)")
            guard = getattr(self._monitor, "guard", None)
            if guard is not None:  # a guard move: the next batch (read after this returns) serves its thresholds
                try:
                    guard.apply(served)
                except Exception:
                    log.exception("applying the live guard's thresholds failed (the old ones keep serving)")
