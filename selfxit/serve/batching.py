"""Micro-batching: concurrent requests share one early-exit run on a single worker thread.

Requests are queued as :class:`Job` s. The worker (the runner is not re-entrant, so there is exactly one)
takes what arrived within ``max_wait_ms`` of the oldest queued job, up to ``max_microbatch`` items
(a request is never split), runs it as one early-exit batch, and routes each item's answer back to
its own request on that request's event loop the moment its exit fires. After the answers have gone
out, the traffic monitor sees the batch (shadow runs and logging add no latency).
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from selfxit.core.conformal import prediction_sets
from selfxit.serve.metrics import ServeMetrics
from selfxit.serve.reload import Served
from selfxit.serve.requests import ApiError

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


# deliver(job, item, exit_position, generation), called on the job's loop for each answered item
Deliver = Callable[[Job, dict, int, int], None]


class Batcher:
    """Gathers queued jobs into micro-batches and runs them on one worker thread.

    ``config`` needs ``max_wait_ms``, ``max_microbatch`` and ``max_queue_items``; ``served()`` returns the
    bundle to run (read once per micro-batch: the hot-reload switch point).
    """

    def __init__(self, config, served: Callable[[], Served], deliver: Deliver, metrics: ServeMetrics,
                 monitor=None):
        self.config, self._served, self._deliver, self._metrics = config, served, deliver, metrics
        self._monitor = monitor
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self.pending_items = 0
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

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it (503) when the queue is full: back-pressure instead of unbounded latency."""
        with self._cv:
            if self.pending_items + len(job.x) > self.config.max_queue_items:
                raise ApiError(503, f"server busy: {self.pending_items} items queued "
                                    f"(max_queue_items {self.config.max_queue_items}); retry later")
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
                        post(job.loop, settle, job.done, ApiError(503, "server shutting down"))
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
                        post(job.loop, settle, job.done, ApiError(500, f"inference failed: {exc}"))

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

    def _run(self, jobs: list[Job]) -> None:
        served = self._served()  # the switch point for hot reload: one model per micro-batch
        ee = served.ee
        ok = self._accept(jobs, served)
        if not ok:
            return
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
                item["set"] = prediction_set(result, job.quantiles)
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
            post(job.loop, settle, job.done, None)
        if self._monitor is not None:  # after the answers went out: shadow runs and logging cost no latency
            encoded = [blob for job in ok for blob in (job.encoded or [None] * len(job.x))]
            try:
                self._monitor.observe(x, output, served.exit_names, ee.backbone, served.version, encoded)
            except Exception:
                log.exception("traffic monitor failed (ignored)")
