"""One wall-clock timer for "early exit against the plain backbone", shared by evaluate and the report.

Latency on these machines moves by tens of percent from run to run, so only ratios measured within
one run mean anything. Both :func:`selfxit.evaluate.evaluation.evaluate` and the HTML report
therefore time the two models the same way, here: on the same batches, after one warm-up call each,
alternating which goes first (the backbone on even batches, the other on odd ones) so that slow
drifts of the machine (frequency, other processes) hit both alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Run = Callable[[torch.Tensor, Callable | None], object]  # run(x, callback or None)


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock stamp covers it (nothing to wait for on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_batch(run: Run, x: torch.Tensor, device: str = "cpu", per_sample: bool = False) -> tuple[float, np.ndarray]:
    """(batch seconds, seconds until each sample's answer) of one ``run(x, callback)``.

    With ``per_sample`` the callback stamps each sample as its answer arrives (the early-exit model
    calls it the moment a sample's exit fires), so samples that leave early count as answered early;
    without it the callback is None and every sample counts at the end of the batch.
    """
    stamps = np.full(len(x), np.nan)
    callback = (lambda r: stamps.__setitem__(r.index, time.perf_counter())) if per_sample else None
    sync(device)
    start = time.perf_counter()
    run(x, callback)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, np.where(np.isnan(stamps), elapsed, stamps - start)


@dataclass
class Timings:
    """What one run took on each batch: batch seconds, and per-sample seconds until each answer."""

    batch_seconds: list[float] = field(default_factory=list)
    sample_seconds: list[np.ndarray] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(self.batch_seconds))


def alternate(runs: dict[str, Run], batches: Sequence[torch.Tensor], device: str = "cpu", per_sample=(),
              on_batch: Callable[[torch.Tensor], None] | None = None) -> dict[str, Timings]:
    """Time every run of ``runs`` on every batch, in inference mode, alternating their order.

    Why this way: see the module docstring. Each run is warmed up once on the first batch; then on
    batch i the runs go in the given order for even i and in reverse order for odd i. ``per_sample``
    names the runs whose answers are stamped per sample (see :func:`time_batch`); ``on_batch`` is
    called after each batch (progress bars). Batches are moved to ``device`` one at a time.
    """
    names = list(runs)
    timings = {name: Timings() for name in names}
    if not batches:
        return timings
    with torch.inference_mode():
        first = batches[0].to(device)
        for name in names:  # warm-up
            runs[name](first, None)
        for i, batch in enumerate(batches):
            x = batch.to(device)
            for name in (names if i % 2 == 0 else names[::-1]):
                elapsed, each = time_batch(runs[name], x, device, name in per_sample)
                timings[name].batch_seconds.append(elapsed)
                timings[name].sample_seconds.append(each)
            if on_batch is not None:
                on_batch(x)
    return timings
