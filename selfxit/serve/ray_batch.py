"""One ``@serve.batch`` run of a Ray Serve replica: the requests Ray Serve gathered as one early-exit batch.

Split from :mod:`.ray_serve` (which needs Ray at import); this needs only torch and selfxit's serving pieces.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from selfxit.serve.batching import TraceGate, answer_item, builds_runner
from selfxit.serve.metrics import ServeMetrics
from selfxit.serve.requests import ApiError


@dataclass
class RayJob:
    """One request's items on their way through a ``@serve.batch`` call (stays inside the replica)."""

    x: torch.Tensor
    t0: float
    encoded: list[tuple[bytes, str]] | None = None
    sets_alpha: float | None = None
    quantiles: torch.Tensor | None = None


def run_jobs(jobs: list[RayJob], served, gate: TraceGate, model_lock: threading.Lock, metrics: ServeMetrics):
    """(per job its sorted items or an ApiError, the batch, the early-exit output, the encoded inputs for the
    traffic log); the output is None when nothing ran. Holds ``model_lock`` while the model runs (a shadow pass
    of the backbone must not run meanwhile: the exits are forward hooks on it) and ``gate`` as the single
    server's worker does (alone while a runner is built, i.e. torch.fx traces)."""
    ee = served.ee
    results: list[Any] = [None] * len(jobs)
    ok = []
    for k, job in enumerate(jobs):
        try:
            ee.check_input(job.x)
            job.quantiles = None if job.sets_alpha is None else ee.set_quantiles(job.sets_alpha)
            ok.append(k)
        except (TypeError, ValueError) as exc:
            results[k] = ApiError(400, str(exc))
    if not ok:
        return results, None, None, []
    x = torch.cat([jobs[k].x for k in ok])
    starts = [0]
    for k in ok[:-1]:
        starts.append(starts[-1] + len(jobs[k].x))
    items: dict[int, list[dict]] = {k: [] for k in ok}

    def callback(result) -> None:
        j = bisect.bisect_right(starts, result.index) - 1
        job, k = jobs[ok[j]], ok[j]
        if not math.isfinite(result.confidence):
            results[k] = ApiError(422, f"the model's output for item {result.index - starts[j]} is not finite "
                                       "(NaN or infinity): the input is outside what the model can answer")
            return
        items[k].append(answer_item(result, result.index - starts[j], served.exit_names, job.t0, job.quantiles))

    try:
        with model_lock, gate.exclusive() if builds_runner(ee) else gate.shared(), \
                torch.inference_mode():
            output = ee(x, callback=callback)
    except Exception as exc:
        return [r if r is not None else ApiError(500, f"inference failed: {exc}") for r in results], None, None, []
    metrics.microbatch(len(ok), len(x))
    for k in ok:
        if results[k] is None:
            results[k] = sorted(items[k], key=lambda item: item["index"])
            for item in results[k]:
                metrics.item(item["exit"], item["latency_ms"] / 1000)
    encoded: list = []
    for k in ok:
        encoded.extend(jobs[k].encoded or [None] * len(jobs[k].x))
    return results, x, output, encoded

