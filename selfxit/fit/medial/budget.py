"""What the medial dataset stores per candidate, and the per-row byte budget it must fit.

Each candidate stores the reduction of its activation that its head consumes (see
:mod:`selfxit.core.heads`: a 4x4 average grid for the default head on conv maps, the token mean for
token sequences), in float16. The budget caps the bytes of one recorded row, all candidates together,
and is checked before anything is recorded.

Why the default is 512 KiB: the default heads of ResNet-50 at 224x224 need 288 KiB per row (ten
candidates from layer1 to layer4: 4x4 grids of 256 to 2048 channels; full maps would take 7.2 MB), so
the default leaves room for finer grids or a declared conv-head input on a layer or two, and it is the
target of 0.5 MB per row. At 1.8 rows per traffic image (every image once, train images twice more
under augmentation) it caps a 100,000-image day at 92 GB; the default heads of ResNet-50 use 53 GB.
A conv head's full input on ResNet-50's ``layer1`` (1.6 MB) does not fit it: such a head must declare a
coarser ``input_grid``, or the caller raises ``budget`` knowingly. The check runs before anything is
recorded and names the costliest candidates.

What ``collect`` stores when it is not told the heads (``heads=None``): the full maps when every
candidate's full map fits the budget together (small models such as the CIFAR ResNets, about 320 KB per
row: any head, conv heads and NAS included, can then be trained, exactly as from the old full-map
store), else what the default head consumes (ResNet-50 at 224: 288 KiB instead of 7.2 MB). Given
heads (``heads=spec``, ``{layer: spec}``), exactly what they consume is stored; ``heads='full'`` asks
for full maps (budget permitting).

``stored_bytes(shape, spec_or_reduction, budget)`` is the per-candidate figure (for ``selfxit
candidates --json``); :func:`plan_storage` does the check of a whole recording (and the default's
choice between full maps and the default head's input).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from selfxit.core.heads import DEFAULT_HEAD, FULL, check_reduction, describe_reduction, input_reduction, reduced_shape

DEFAULT_ROW_BUDGET = 512 * 1024  # bytes per recorded row, all candidates together
DTYPES = ("float16", "float32")
FULL_MAPS = "full"  # collect(heads="full"): store every candidate's full activation (budget permitting)


class MedialBudgetError(ValueError):
    """The reductions the heads consume do not fit the per-row byte budget (raised before recording)."""


@dataclass(frozen=True)
class CandidateStorage:
    """What one candidate stores per row."""

    name: str
    shape: tuple[int, ...]  # the full per-sample activation shape
    reduction: dict  # normalised (see selfxit.core.heads.check_reduction)
    stored_shape: tuple[int, ...]
    bytes: int  # per row

    def describe(self) -> str:
        return f"{self.name}: {describe_reduction(self.shape, self.reduction)}, {self.bytes:,} bytes"


@dataclass(frozen=True)
class StoragePlan:
    """What a recording stores per row, per candidate, and the budget it was checked against."""

    candidates: tuple[CandidateStorage, ...]
    budget: int | None
    dtype: str

    @property
    def bytes_per_row(self) -> int:
        return sum(c.bytes for c in self.candidates)

    @property
    def reductions(self) -> list[dict]:
        return [c.reduction for c in self.candidates]

    @property
    def stored_shapes(self) -> list[tuple[int, ...]]:
        return [c.stored_shape for c in self.candidates]


def _reduction_of(shape: tuple[int, ...], spec_or_reduction) -> dict:
    """A reduction from a head spec ({'kind': ...}), a reduction ({'reduce': ...}), 'full' or None (default head)."""
    if spec_or_reduction is None:
        spec_or_reduction = DEFAULT_HEAD
    if spec_or_reduction == FULL_MAPS:
        return dict(FULL)
    if isinstance(spec_or_reduction, dict) and "reduce" in spec_or_reduction:
        return check_reduction(spec_or_reduction, tuple(shape))
    if isinstance(spec_or_reduction, dict) and "kind" in spec_or_reduction:
        return input_reduction(spec_or_reduction, tuple(shape))
    raise ValueError(f"expected a head spec ({{'kind': ...}}), a reduction ({{'reduce': ...}}), 'full' or None; "
                     f"got {spec_or_reduction!r}")


def _itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"medial dtype must be one of {DTYPES}; got {dtype!r}")
    return np.dtype(dtype).itemsize


def stored_bytes(shape, spec_or_reduction=None, budget: int | None = None, dtype: str = "float16") -> int:
    """Bytes per recorded row that one candidate of per-sample activation ``shape`` stores for a head spec (or a
    reduction dict, ``'full'``, or None for the default head). With ``budget`` (bytes per row), a
    :class:`MedialBudgetError` says what it costs when it alone does not fit."""
    shape = tuple(int(s) for s in shape)
    reduction = _reduction_of(shape, spec_or_reduction)
    size = int(np.prod(reduced_shape(shape, reduction))) * _itemsize(dtype)
    if budget is not None and size > budget:
        raise MedialBudgetError(
            f"the {describe_reduction(shape, reduction)} takes {size:,} bytes per row, over the budget of "
            f"{budget:,}: give the head a coarser input (e.g. 'input_grid' for conv heads) or raise the budget")
    return size


def _per_layer(names: list[str], heads) -> dict:
    """{name: spec, reduction, 'full' or None} from collect's ``heads`` (one spec for all, 'full', a per-layer dict
    of specs/reductions, or None)."""
    if heads is None or heads == FULL_MAPS or (isinstance(heads, dict) and ("kind" in heads or "reduce" in heads)):
        return {n: heads for n in names}
    if not isinstance(heads, dict):
        raise ValueError(f"heads must be a head spec, 'full', or {{layer: spec}}; got {heads!r}")
    unknown = sorted(set(heads) - set(names))
    if unknown:
        raise ValueError(f"head specs for unknown layers {unknown}; candidates are {names}")
    return {n: heads.get(n) for n in names}


def plan_storage(names: list[str], shapes: list[tuple[int, ...]], heads=None,
                 budget: int | None = DEFAULT_ROW_BUDGET, dtype: str = "float16") -> StoragePlan:
    """Per-candidate reductions and bytes for a recording whose heads are ``heads`` (as ``collect`` takes them:
    None, one spec, ``{layer: spec or None}``, ``'full'``), checked against ``budget`` bytes per row (None: no
    cap). None picks full maps when they fit, else the default head's input (see the module docs). Raises
    :class:`MedialBudgetError` naming the costliest candidates and the fixes, before anything is recorded."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise ValueError(f"budget must be a positive number of bytes per row (or None for no cap); got {budget!r}")
    if heads is None:  # not told the heads: full maps when they fit (any head can be trained), else the default's input
        full = plan_storage(names, shapes, FULL_MAPS, None, dtype)
        if budget is None or full.bytes_per_row <= budget:
            return StoragePlan(full.candidates, None if budget is None else int(budget), dtype)
        heads = DEFAULT_HEAD
    per_layer = _per_layer(list(names), heads)
    items = []
    for name, shape in zip(names, shapes):
        shape = tuple(int(s) for s in shape)
        try:
            reduction = _reduction_of(shape, per_layer[name])
        except ValueError as exc:
            raise ValueError(f"candidate {name!r} (activation {shape}): {exc}") from None
        items.append(CandidateStorage(name, shape, reduction, reduced_shape(shape, reduction),
                                      stored_bytes(shape, reduction, dtype=dtype)))
    plan = StoragePlan(tuple(items), None if budget is None else int(budget), dtype)
    if budget is not None and plan.bytes_per_row > budget:
        costly = sorted(items, key=lambda c: -c.bytes)[:4]
        raise MedialBudgetError(
            f"the medial dataset would store {plan.bytes_per_row:,} bytes per row, over the budget of {budget:,} "
            f"bytes; the largest: {'; '.join(c.describe() for c in costly)}. Fix: give those layers' heads a coarser "
            f"input (pool_mlp 'pool', conv_linear 'input_grid'), record fewer candidates, or pass "
            f"budget={_round_up(plan.bytes_per_row)} to collect if that much disk per row is intended")
    return plan


def _round_up(n: int) -> int:
    step = 64 * 1024
    return -(-n // step) * step
