"""The bucketed runtime: the backbone as stages, each run with its exit at a fixed ladder of batch sizes.

Why: on a GPU the hook runtime (:mod:`selfxit.core.runtime`) loses to the plain backbone. Every exit adds its
head's kernels and a host sync for the threshold test, and the shrunk batches come in ever new sizes, each
starting cold. Here the backbone is cut at the active exits (:mod:`selfxit.core.stages`); each stage with its
head and decision is one step (:mod:`selfxit.core.fused`), run only at the buckets of a ladder
(:mod:`selfxit.core.buckets`), so each step can be compiled or captured as a CUDA graph once per bucket and
warmed before serving. Survivors are compacted on the device into the front of the next bucket, padded with
rows whose results are dropped. Two ways to choose that bucket (``sync``):

- ``count``: the host reads one number per exit, the survivor count, and picks the smallest bucket that holds
  it (the pass stops when none survive);
- ``fixed``: no read at all during the pass. After exit k the bucket is fixed in advance from the exits' hit
  rates (:func:`selfxit.core.buckets.fixed_buckets`); survivors that do not fit are set aside on the device and,
  after one read at the end, finish on the counted path, so every sample is still answered.

Answers: an exited sample gets its head's answer, a non-exited one the backbone's logits computed at a bucket
size. On CPU with ``compile='off'`` rows are computed exactly as the backbone computes them at that batch size;
bit-exactness against the backbone at the caller's batch size is the hook runtime's promise, not this one's
(kernels may differ in the last bits between batch sizes, and compiled kernels differ from eager ones). Padding
rows never change a real row's answer: each row's result depends on that row alone.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from selfxit.core import buckets as bk
from selfxit.core.exits import ExitRecord
from selfxit.core.fused import COMPILE_MODES, Decide, Step, build_step, warm_error
from selfxit.core.runtime import FINAL, EarlyExitOutput, SampleResult, _with_temperature
from selfxit.core.stages import split_stages

ENGINES = ("hooks", "buckets")
SYNCS = ("count", "fixed")


@dataclass
class RuntimeConfig:
    """How an :class:`~selfxit.api.EarlyExitModel` runs (``ee.runtime = RuntimeConfig(...)``).

    ``engine='hooks'`` (the default) is the hook runtime: bit-exact backbone answers on CPU, no compiling.
    ``engine='buckets'`` is this module's runtime, with ``compile`` (see :mod:`selfxit.core.fused`), a ladder of
    ``buckets`` covering ``max_batch`` (default: powers of two up to it) and ``sync``; ``hit_rates`` (fraction
    of all samples each active exit answers) fix the buckets for ``sync='fixed'``.
    """

    engine: str = "hooks"
    compile: str = "off"
    max_batch: int = 512
    buckets: tuple[int, ...] | None = None
    sync: str = "count"
    hit_rates: tuple[float, ...] | None = None

    def validate(self) -> "RuntimeConfig":
        """Refuse a bad setting, naming it; returns self with ``buckets`` set to the checked ladder."""
        if self.engine not in ENGINES:
            raise ValueError(f"runtime engine must be one of {ENGINES}; got {self.engine!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"runtime compile must be one of {COMPILE_MODES}; got {self.compile!r}")
        if self.sync not in SYNCS:
            raise ValueError(f"runtime sync must be one of {SYNCS}; got {self.sync!r}")
        if self.engine == "hooks" and (self.compile != "off" or self.sync != "count"):
            raise ValueError("runtime compile and sync apply to engine='buckets'; the hook engine runs eagerly")
        self.buckets = bk.ladder(self.max_batch, self.buckets)
        if self.sync == "fixed" and self.hit_rates is None:
            raise ValueError("runtime sync='fixed' needs hit_rates (the fraction of samples each exit answers)")
        return self


class _Store:
    """The answers of one chunk, recorded as each step gives them and written into one tensor at the end with
    masks on the device (padding rows write back what was there). A chunk that one step answered whole, in
    input order, is returned as that step gave it: the no-fire pass and the plain backbone write nothing."""

    def __init__(self, rows: int, size: int):
        self.rows, self.size = rows, size
        self.records: list[tuple] = []

    def add(self, idx: torch.Tensor, hit: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, position: int,
            whole: bool = False) -> None:
        self.records.append((idx, hit, logits, probs, position, whole))

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, hit, logits, probs, position, whole = self.records[0]
        rows = self.rows
        if len(self.records) == 1 and whole:
            return logits[:rows], probs[:rows], torch.full((rows,), position, dtype=torch.long, device=logits.device)
        out_logits = logits.new_zeros((self.size, logits.shape[1]))
        out_probs = probs.new_zeros((self.size, probs.shape[1]))
        out_exit = torch.full((self.size,), FINAL, dtype=torch.long, device=logits.device)
        for idx, hit, logits, probs, position, _ in self.records:
            column = hit[:, None]
            out_logits[idx] = torch.where(column, logits.to(out_logits.dtype), out_logits[idx])
            out_probs[idx] = torch.where(column, probs.to(out_probs.dtype), out_probs[idx])
            out_exit[idx] = torch.where(hit, position, out_exit[idx])
        return out_logits[:rows], out_probs[:rows], out_exit[:rows]


class BucketedRunner:
    """Early exit over the backbone's stages at bucket sizes (see the module docstring). Not re-entrant.

    ``with_thresholds`` gives a runner with other thresholds over the same compiled (or captured) steps.
    """

    def __init__(self, backbone: nn.Module, exits: list[ExitRecord], num_classes: int, config: RuntimeConfig):
        self.config = config.validate()
        self.sizes: tuple[int, ...] = tuple(config.buckets or ())
        self.exits, self.num_classes = list(exits), num_classes
        chained = [e.layer for e in self.exits if hasattr(e.head, "reads_previous")]
        if chained:
            raise ValueError(f"exits {chained} have chained heads, which read the chain of earlier heads: "
                             "run them on the hook engine (runtime engine='hooks')")
        params = [*backbone.parameters(), *backbone.buffers()]
        self.device = params[0].device if params else torch.device("cpu")
        stages = split_stages(backbone, [e.layer for e in self.exits])
        pool = torch.cuda.graph_pool_handle() if config.compile == "cudagraph" and self.device.type == "cuda" else None
        decides = [Decide(_with_temperature(e.head, e.temperature), e.gate) for e in self.exits]
        names = [f"exit {e.layer}" for e in self.exits] + ["the last stage"]
        self._steps: list[Callable] = [build_step(stage, decide, config.compile, name, self.device, pool)
                                       for stage, decide, name in zip(stages, [*decides, None], names)]
        self._thresholds = self._threshold_tensors([float(e.threshold or 0.0) for e in self.exits])
        self._values = [float(t) for t in self._thresholds]  # the same thresholds on the host (float32-rounded)
        # eager steps take the hook runtime's shortcut: one reduction and one read when nothing can fire
        self._lean = all(isinstance(step, Step) and (step.decide is None or isinstance(step.decide, Decide))
                         for step in self._steps)
        self._carry_previous = any(getattr(e.gate, "previous", False) for e in self.exits)
        self._fixed: dict[int, list[int]] = {}
        if config.sync == "fixed" and len(config.hit_rates or ()) != len(self.exits):
            raise ValueError(f"runtime hit_rates has {len(config.hit_rates or ())} entries for {len(self.exits)} "
                             "active exits")
        self.warm_buckets: list[int] = []
        self._rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _threshold_tensors(self, values: list[float]) -> list[torch.Tensor]:
        if len(values) != len(self.exits):
            raise ValueError(f"{len(values)} thresholds for {len(self.exits)} active exits")
        return [torch.tensor(float(v), device=self.device) for v in values]

    def with_thresholds(self, values: list[float]) -> "BucketedRunner":
        """A runner with these thresholds (one per active exit) sharing this one's steps: no recompile."""
        other = copy.copy(self)
        other._thresholds = self._threshold_tensors(values)
        other._values = [float(t) for t in other._thresholds]
        return other

    def with_sync(self, sync: str, hit_rates: tuple[float, ...] | None = None) -> "BucketedRunner":
        """A runner choosing buckets the other way (``count`` or ``fixed`` from ``hit_rates``) over the same
        compiled (or captured) steps: compare both modes without compiling twice."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, sync=sync, hit_rates=hit_rates).validate()
        if sync == "fixed" and len(hit_rates or ()) != len(self.exits):
            raise ValueError(f"runtime hit_rates has {len(hit_rates or ())} entries for {len(self.exits)} active exits")
        other._fixed = {}
        return other

    def set_thresholds(self, values: list[float]) -> None:
        """Move the thresholds in place (no recompile, no recapture)."""
        for tensor, value in zip(self._thresholds, self._threshold_tensors(values)):
            tensor.copy_(value)
        self._values = [float(t) for t in self._thresholds]

    def _run_step(self, position: int, x: torch.Tensor, valid: torch.Tensor, previous: torch.Tensor | None):
        step = self._steps[position]
        if position == len(self.exits):
            return step(x)
        if previous is None:
            return step(x, self._thresholds[position], valid)
        return step(x, self._thresholds[position], valid, previous)

    @torch.inference_mode()
    def warm(self, example: torch.Tensor) -> list[int]:
        """Run every step at every bucket on zeros shaped like ``example``'s rows, so that every compile and
        capture happens now; returns the buckets warmed. A CUDA out-of-memory names the bucket and step."""
        for size in self.sizes:
            x = example.new_zeros((size, *example.shape[1:]), device=self.device)
            valid = torch.ones(size, dtype=torch.bool, device=self.device)
            previous = None
            for position in range(len(self._steps)):
                try:
                    out = self._run_step(position, x, valid, previous)
                except torch.cuda.OutOfMemoryError as exc:
                    raise warm_error(exc, size, "the last stage" if position == len(self.exits)
                                     else f"exit {self.exits[position].layer}") from exc
                x = out[0]
                previous = out[2] if self._carry_previous and len(out) > 1 else None
            if size not in self.warm_buckets:
                self.warm_buckets.append(size)
        return list(self.warm_buckets)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, callback: Callable[[SampleResult], None] | None = None) -> EarlyExitOutput:
        """Answer every row of ``x`` (batches above the largest bucket run as consecutive chunks)."""
        if x.device != self.device:
            raise ValueError(f"input is on {x.device}, the model on {self.device}: move one of them (ee.to(device))")
        parts = [self._chunk(x[i:i + self.sizes[-1]], i, callback) for i in range(0, len(x), self.sizes[-1])]
        if len(parts) == 1:
            logits, probs, exits = parts[0]
        else:
            logits, probs, exits = (torch.cat([p[k] for p in parts]) for k in range(3))
        confidence, predictions = probs.max(dim=1)
        return EarlyExitOutput(predictions, probs, logits, confidence, exits)

    def _chunk(self, x: torch.Tensor, offset: int, callback):
        rows = len(x)
        size = bk.bucket_for(rows, self.sizes)
        store = _Store(rows, size)
        if (size, rows) not in self._rows:  # the row indices and real-row mask of a chunk, made once per shape
            idx = torch.arange(size, device=self.device)
            self._rows[(size, rows)] = (idx, idx < rows)
        idx, valid = self._rows[(size, rows)]
        self._from(0, bk.pad_rows(x, size), idx, valid, None, store, self.config.sync == "fixed",
                   _Report(callback, rows, offset), rows, in_order=True)
        return store.result()

    def _from(self, first: int, cur: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, previous, store: _Store,
              fixed: bool, report: "_Report", alive: int | None = None, in_order: bool = False) -> None:
        """Run steps ``first``... on ``cur`` (a bucket: rows ``idx`` of the chunk, real where ``valid``; ``alive``
        real rows when known; ``in_order``: ``idx`` is still the identity). Counted: nothing is recorded, gathered
        or compacted after an exit no row took, unless the survivors fit a smaller bucket; fixed: always, at the
        fixed sizes, with no host read."""
        overflow = []
        for position in range(first, len(self.exits)):
            if self._lean and not fixed:
                step = cast(Step, self._steps[position])  # lean: every step is an eager Step
                y = step.stage(cur)
                logits, probs, score = cast(Decide, step.decide).scores(y, previous)
                if alive == len(cur) and float(score.max()) < self._values[position]:
                    cur, previous = y, (probs if self._carry_previous else None)
                    continue  # nothing fires (the common case): one reduction, one read
                fires = score >= self._thresholds[position]
                hit, keep = fires & valid, valid & ~fires
                count = keep.sum()
            else:
                y, logits, probs, hit, keep, count = self._run_step(position, cur, valid, previous)
            if fixed:
                store.add(idx, hit, logits, probs, position)
                report(idx, hit, probs, position)
                size = min(len(cur), self._fixed_sizes(store.size)[position])
            else:
                going = int(count)  # the one host read of this exit
                if going != alive:
                    store.add(idx, hit, logits, probs, position, in_order and going == 0 and alive == store.rows)
                    report(idx, hit, probs, position)
                alive = going
                if going == 0:
                    return
                size = bk.bucket_for(going, self.sizes)
            if size == len(cur):  # same bucket: rows that exited stay as padding
                cur, valid = y, keep
                previous = probs if self._carry_previous else None
                continue
            order = bk.full_order(keep)
            take = order[:size]
            if fixed:
                rest = order[size:]
                overflow.append((position + 1, y[rest], idx[rest], keep[rest],
                                 probs[rest] if self._carry_previous else None))
            cur, idx, valid, in_order = y[take], idx[take], keep[take], False
            previous = probs[take] if self._carry_previous else None
        last = cast(Step, self._steps[-1])
        (logits,) = (last.stage(cur),) if self._lean else self._run_step(len(self.exits), cur, valid, None)
        probs = logits.softmax(dim=1)
        store.add(idx, valid, logits, probs, FINAL, in_order and alive == store.rows)
        report(idx, valid, probs, FINAL)
        if overflow:  # one read for all of them: how many set-aside survivors each exit left
            counts = torch.stack([o[3].sum() for o in overflow]).tolist()
            for (start, y, rows, keep, prev), going in zip(overflow, counts):
                if going:
                    size = bk.bucket_for(int(going), self.sizes)
                    take = bk.compaction(keep, size)
                    self._from(start, y[take], rows[take], keep[take], None if prev is None else prev[take],
                               store, False, report, int(going))

    def _fixed_sizes(self, chunk_bucket: int) -> list[int]:
        if chunk_bucket not in self._fixed:
            self._fixed[chunk_bucket] = bk.fixed_buckets(list(self.config.hit_rates or ()), chunk_bucket, self.sizes)
        return self._fixed[chunk_bucket]


class _Report:
    """Hands each real row's answer to the caller's callback (a host read per exit; none without a callback)."""

    def __init__(self, callback, rows: int, offset: int):
        self.callback, self.rows, self.offset = callback, rows, offset

    def __call__(self, idx: torch.Tensor, hit: torch.Tensor, probs: torch.Tensor, position: int) -> None:
        if self.callback is None:
            return
        where = torch.nonzero(hit & (idx < self.rows)).flatten()
        answered = probs[where].cpu()  # the callback reads numbers: one copy to the host per exit
        confidence, prediction = answered.max(dim=1)
        for j, row in enumerate(idx[where].tolist()):
            self.callback(SampleResult(self.offset + row, int(prediction[j]), float(confidence[j]), position,
                                       answered[j]))
