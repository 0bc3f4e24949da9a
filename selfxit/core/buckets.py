"""Batch buckets: the fixed ladder of batch sizes the bucketed runtime runs at, and on-device compaction.

Why buckets: a shrinking batch comes out of every exit at a new size, and on a GPU each new size starts
cold (cuDNN autotuning, compiled kernels, captured graphs are all per shape). Running every stage only at
the sizes of a fixed ladder (powers of two up to the serving maximum by default) means every shape is
seen, compiled and captured once, before serving starts. Survivors are gathered on the device into the
front of the next bucket; the rest of the bucket holds padding rows (rows that already have their answer,
or filler), whose results are dropped. A row's result never depends on the other rows of its batch, so
padding cannot change a real row's answer.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch


def ladder(max_batch: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The bucket ladder for batches up to ``max_batch``: ``buckets`` checked, or powers of two up to it.

    A ladder that does not cover ``max_batch`` is refused here (at start-up), not when a large batch
    arrives: ValueError naming the largest bucket and the maximum batch.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int; got {max_batch!r}")
    if buckets is None:
        sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch] + [max_batch]
        return tuple(sizes)
    sizes = list(buckets)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"buckets must be positive ints; got {list(buckets)!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"buckets must be distinct; got {sizes}")
    sizes.sort()
    if sizes[-1] < max_batch:
        raise ValueError(f"bucket ladder {sizes} does not cover the maximum batch {max_batch}: "
                         f"add a bucket of at least {max_batch} or lower the maximum batch")
    return tuple(sizes)


def bucket_for(rows: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows`` rows (ValueError past the largest)."""
    at = bisect.bisect_left(sizes, rows)
    if at == len(sizes):
        raise ValueError(f"{rows} rows do not fit the largest bucket {sizes[-1]} of the ladder {list(sizes)}")
    return sizes[at]


def compaction(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Indices [size] that gather the rows where ``keep`` is true to the front, then the others (padding).

    Runs on ``keep``'s device without reading anything back: a stable sort of the flags, so survivors keep
    their order. ``size`` may be below the number of survivors (a fixed bucket that overflowed); the
    survivors beyond it are the indices from ``size`` on of the full order, see :func:`full_order`.
    """
    return full_order(keep)[:size]


def full_order(keep: torch.Tensor) -> torch.Tensor:
    """Every row index, survivors first (in order), then the rest."""
    return torch.argsort(keep.logical_not().to(torch.int8), stable=True)


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``size`` rows (the padding of a batch smaller than its bucket)."""
    if len(x) == size:
        return x
    if len(x) > size:
        raise ValueError(f"{len(x)} rows do not fit a bucket of {size}")
    return torch.cat([x, x.new_zeros((size - len(x), *x.shape[1:]))])


def fixed_buckets(hit_rates: Sequence[float], batch: int, sizes: Sequence[int], sigmas: float = 3.0) -> list[int]:
    """Bucket after each exit for a batch of ``batch``, fixed in advance from the exits' hit rates.

    ``hit_rates[k]`` is the fraction of all samples that exit k answers (as the fit reports it). The bucket
    after exit k holds the expected survivors plus ``sigmas`` binomial standard deviations, so it overflows
    rarely; a batch that overflows it still gets every answer (the overflowing rows finish on the counted
    path after one read at the end). Buckets never grow along the cascade and never exceed ``batch``'s.
    """
    if any(not 0.0 <= r <= 1.0 for r in hit_rates) or sum(hit_rates) > 1.0 + 1e-6:
        raise ValueError(f"hit rates must be fractions of all samples summing to at most 1; got {list(hit_rates)}")
    out, current, answered = [], bucket_for(batch, sizes), 0.0
    for rate in hit_rates:
        answered += rate
        survive = min(max(1.0 - answered, 0.0), 1.0)
        bound = batch * survive + sigmas * math.sqrt(batch * survive * (1.0 - survive)) + 1.0
        current = min(current, bucket_for(min(batch, math.ceil(bound)), sizes))
        out.append(current)
    return out
