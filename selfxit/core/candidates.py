"""Candidate exit layers of a frozen classifier, found automatically and chosen by cost.

An exit can sit after a module only if the rest of the forward pass depends on that module's output
tensor alone: then an exit head can read it, and a forward hook can shrink the batch to the samples that
did not exit by returning a slice of it. In the ``torch.fx`` graph such points are articulation points:
nodes that every data edge crossing the cut just after them starts from. Each one is attributed to the
outermost named module whose forward returns it.

What counts as data, and how a forward that reads the batch size keeps working on a shrunk batch, is
:mod:`selfxit.core.graph`.

Which articulation points become candidates is decided by cost (:func:`candidate_table`): each one's
cumulative share of the backbone FLOPs is measured, layers in the first ``min_flops_before`` (5%) of the
FLOPs or with under ``min_flops_after`` (5%) of them left after, or with fewer FLOPs left than the
cheapest head costs there, are rejected, and at most ``max_candidates`` are spread evenly over the
cumulative FLOPs of the rest.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfxit.core.flops import count_flops, cumulative_flops, unknown_module_error
from selfxit.core.graph import CONSTANT, articulation_modules, classify, trace  # noqa: F401 (until core/stages imports them from graph)

# Modules that leave a tensor unchanged at inference; an exit after one would duplicate its input's exit.
_NO_OP_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity, nn.Flatten,
)
MIN_FLOPS_BEFORE = 0.05  # no candidate in the first 5% of the backbone's FLOPs (too little computed to exit)
MIN_FLOPS_AFTER = 0.05  # none with under 5% of the FLOPs left after it (too little to save)
MIN_FLOPS_GAP = 0.01  # of layers closer than 1% of the FLOPs apart (conv, bn, relu), only the last is kept
CHEAPEST_HEAD = {"kind": "pool_mlp", "pool": 1, "hidden": []}  # global average pool + one linear layer



@dataclass(frozen=True)
class Candidate:
    """A layer after which an exit can be installed.

    Attributes:
        name: qualified module name, hookable via ``dict(model.named_modules())[name]``.
        shape: activation shape for one sample, without the batch dimension.
        remaining_flops: backbone FLOPs after this layer, per sample (see ``selfxit.core.flops``).
        cumulative_flops_fraction: share of the backbone's FLOPs spent up to and including this layer
            (0 to 1); None where it was not measured (bundles written before it existed).
    """

    name: str
    shape: tuple[int, ...]
    remaining_flops: int
    cumulative_flops_fraction: float | None = None

    def to_dict(self) -> dict:
        """JSON-friendly form: ``{"name", "shape" (a list), "remaining_flops", "cumulative_flops_fraction"}``
        (the fraction only when known)."""
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "remaining_flops": self.remaining_flops}
        if self.cumulative_flops_fraction is not None:
            out["cumulative_flops_fraction"] = self.cumulative_flops_fraction
        return out


@dataclass(frozen=True)
class LayerVerdict:
    """One articulation point's entry in :func:`candidate_table`: kept as a candidate, or why not.

    ``shape`` is None for a module that does not return a tensor, the FLOPs fields are None for one that
    never runs; ``reason`` is None exactly when ``kept``.
    """

    name: str
    depth: int
    shape: tuple[int, ...] | None
    remaining_flops: int | None
    cumulative_flops_fraction: float | None
    kept: bool
    reason: str | None = None

    def candidate(self) -> Candidate:
        """The kept layer as a :class:`Candidate`."""
        if not self.kept or self.shape is None or self.remaining_flops is None:
            raise ValueError(f"{self.name} is not a candidate: {self.reason}")
        return Candidate(self.name, self.shape, self.remaining_flops, self.cumulative_flops_fraction)

    def to_dict(self) -> dict:
        """``Candidate.to_dict()``'s keys (shape may be null), plus ``kept`` and, when rejected, ``reason``."""
        out: dict[str, Any] = {"name": self.name, "shape": None if self.shape is None else list(self.shape),
                               "remaining_flops": self.remaining_flops,
                               "cumulative_flops_fraction": self.cumulative_flops_fraction, "kept": self.kept}
        if not self.kept:
            out["reason"] = self.reason
        return out


def find_candidates(
    model: nn.Module, example_input: torch.Tensor, max_candidates: int = 10, names: list[str] | None = None,
    *, min_flops_before: float = MIN_FLOPS_BEFORE, min_flops_after: float = MIN_FLOPS_AFTER,
    min_flops_gap: float = MIN_FLOPS_GAP,
) -> list[Candidate]:
    """Candidate exit layers of ``model`` in forward order, at most ``max_candidates`` of them.

    Without ``names``: the layers :func:`candidate_table` keeps (articulation points chosen by cost; the
    ``min_flops_*`` settings are its).

    With ``names`` exactly those modules are described, in forward order, after checking that each exists,
    runs exactly once and returns a tensor (ValueError otherwise); no filter or cap applies.

    ``example_input`` is a batch; only ``example_input[:1]`` is run. The model is left as found.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    if names is None:
        table = candidate_table(model, example_input, max_candidates, min_flops_before=min_flops_before,
                                min_flops_after=min_flops_after, min_flops_gap=min_flops_gap)
        return [entry.candidate() for entry in table if entry.kept]
    x = example_input[:1]
    chosen, shapes = _validated(model, x, names)
    if not chosen:
        return []
    total, reached = cumulative_flops(model, example_input, chosen)
    return [Candidate(name, shapes[name], total - reached[name], _fraction(reached[name], total)) for name in chosen]


def candidate_table(
    model: nn.Module, example_input: torch.Tensor, max_candidates: int = 10,
    *, min_flops_before: float = MIN_FLOPS_BEFORE, min_flops_after: float = MIN_FLOPS_AFTER,
    min_flops_gap: float = MIN_FLOPS_GAP,
) -> list[LayerVerdict]:
    """Every articulation point of ``model`` (:func:`articulation_modules`) in forward order, kept or not.

    A layer is rejected, with the first reason that applies, when it
    - is an inference no-op (dropout, identity, flatten) or returns its input tensor unchanged,
    - does not run exactly once per forward pass, or does not return a tensor,
    - ends within the first ``min_flops_before`` of the backbone's FLOPs (an exit there has seen too little),
    - leaves under ``min_flops_after`` of the FLOPs after it, or fewer FLOPs than the cheapest head
      (:data:`CHEAPEST_HEAD`, global pooling and one linear layer) costs on its output (no exit there can
      pay for its head),
    - where more layers remain than ``max_candidates``, lies deeper than the coarsest module level that
      still has ``max_candidates`` of them (block outputs, not the layers inside blocks),
    - lies less than ``min_flops_gap`` (1%) of the FLOPs after the first of a run of remaining layers
      (near-duplicates such as conv, norm, activation) and is not its shallowest, or last of the shallowest,
    - is not among the ``max_candidates`` picked from the remaining ones so that their cumulative FLOPs
      fractions lie as close as possible to evenly spaced points from the first to the last of them.

    If the model cannot be traced by ``torch.fx``, its top-level children are judged instead, with a warning.
    ``example_input`` is a batch; only ``example_input[:1]`` is run. The model is left as found.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    x = example_input[:1]
    try:
        ranked = articulation_modules(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "using its top-level children as candidate exits",
            stacklevel=3,
        )
        probe = _probe(model, x, [name for name, _ in model.named_children()])
        ranked = [(name, 1) for name in probe.order]
    else:
        probe = _probe(model, x, [name for name, _ in ranked])
    modules = dict(model.named_modules())

    ran = [name for name, _ in ranked if probe.calls.get(name, 0) >= 1]
    total, reached = cumulative_flops(model, x, ran) if ran else (0, {})
    classes = probe.classes
    head_cost: dict[tuple[int, ...], int | None] = {}

    def verdict(name: str) -> str | None:
        module, calls, shape = modules[name], probe.calls.get(name, 0), probe.shapes.get(name)
        if isinstance(module, _NO_OP_TYPES):
            return f"no-op at inference ({type(module).__name__})"
        if calls != 1:
            return "never runs during forward" if calls == 0 else f"runs {calls} times per forward pass"
        if shape is None:
            return "does not return a tensor"
        if name in probe.passthrough:
            return "returns its input tensor unchanged"
        before = _fraction(reached[name], total)
        if before < min_flops_before:
            return f"only {before:.1%} of the FLOPs are spent before it (minimum {min_flops_before:.0%})"
        remaining = total - reached[name]
        if 1 - before < min_flops_after:
            return f"only {1 - before:.1%} of the FLOPs remain after it (minimum {min_flops_after:.0%})"
        if shape not in head_cost:
            head_cost[shape] = _cheapest_head_flops(shape, classes)
        cost = head_cost[shape]
        if cost is not None and remaining <= cost:
            return f"the {remaining:,} FLOPs left after it do not pay for the cheapest head ({cost:,} FLOPs)"
        return None

    reasons = {name: verdict(name) for name, _ in ranked}
    fraction = {name: _fraction(reached[name], total) for name in reached}
    _choose([name for name, _ in ranked if reasons[name] is None], fraction, dict(ranked), reasons,
            max_candidates, min_flops_gap)
    return [
        LayerVerdict(name, d, probe.shapes.get(name), total - reached[name] if name in reached else None,
                     fraction.get(name), reasons[name] is None, reasons[name])
        for name, d in ranked
    ]


def _choose(eligible: list[str], fraction: dict[str, float], depth: dict[str, int], reasons: dict[str, str | None],
            cap: int, gap: float) -> None:
    """Pick at most ``cap`` of ``eligible`` (forward order), writing why each other one was not into ``reasons``:
    the coarsest module level that can fill the cap, one layer per run of near-duplicates, then the spread."""
    if len(eligible) > cap:  # blocks, not their insides
        level = min(d for d in set(depth.values()) if sum(depth[n] <= d for n in eligible) >= cap)
        coarse = [name for name in eligible if depth[name] <= level]
        for name in eligible:
            if depth[name] > level:
                reasons[name] = (f"inside a block: the {len(coarse)} eligible layers at depth <= {level} "
                                 f"already fill max_candidates ({cap})")
        eligible = coarse
    for run in _near_duplicates([fraction[n] for n in eligible], gap):
        best = eligible[min(run, key=lambda i: (depth[eligible[i]], -i))]  # the shallowest, then the last
        for name in (eligible[i] for i in run if eligible[i] != best):
            reasons[name] = (f"near-duplicate of {best}, {abs(fraction[best] - fraction[name]):.1%} of the FLOPs "
                             f"apart (of layers closer than {gap:.0%}, only the shallowest, then the last, is "
                             "considered)")
    eligible = [name for name in eligible if reasons[name] is None]
    chosen = set(_spread([fraction[n] for n in eligible], [depth[n] for n in eligible], cap))
    for i, name in enumerate(eligible):
        if i not in chosen:
            reasons[name] = f"not among the {cap} spread over the FLOPs (max_candidates)"


def _fraction(part: int, total: int) -> float:
    return float(part) / total if total > 0 else 0.0


def _cheapest_head_flops(shape: tuple[int, ...], classes: int | None) -> int | None:
    """FLOPs of :data:`CHEAPEST_HEAD` on one activation of ``shape``; None where no head fits that shape."""
    from selfxit.core.heads import build_head
    if classes is None:
        return None
    try:
        head = build_head(CHEAPEST_HEAD, shape, classes)
    except ValueError:
        return None
    return count_flops(head, torch.zeros(1, *shape))


def _near_duplicates(fractions: list[float], gap: float) -> list[list[int]]:
    """Runs of indices (``fractions`` ascending) that start at a fraction and hold every later one less than
    ``gap`` beyond that start; runs of a single index are left out."""
    runs: list[list[int]] = []
    start = 0
    for i in range(1, len(fractions) + 1):
        if i == len(fractions) or fractions[i] - fractions[start] >= gap:
            if i - start > 1:
                runs.append(list(range(start, i)))
            start = i
    return runs


def _spread(fractions: list[float], depths: list[int], cap: int) -> list[int]:
    """Indices of at most ``cap`` of ``fractions`` (ascending), closest to evenly spaced targets.

    The targets run from the first to the last fraction (one target: their midpoint); the chosen indices,
    in increasing order, minimise the summed distance to them (dynamic programming), the shallower layer
    winning ties.
    """
    n = len(fractions)
    if n <= cap:
        return list(range(n))
    lo, hi = fractions[0], fractions[-1]
    targets = [(lo + hi) / 2] if cap == 1 else [lo + j * (hi - lo) / (cap - 1) for j in range(cap)]
    inf = float("inf")
    # cost[j][i]: best total for targets 0..j with target j matched to index i; back[j][i]: index for j-1.
    cost = [[inf] * n for _ in range(cap)]
    back = [[-1] * n for _ in range(cap)]
    for i in range(n):
        cost[0][i] = abs(fractions[i] - targets[0]) + 1e-9 * depths[i]
    for j in range(1, cap):
        best, arg = inf, -1
        for i in range(j, n):
            if cost[j - 1][i - 1] < best:
                best, arg = cost[j - 1][i - 1], i - 1
            cost[j][i] = best + abs(fractions[i] - targets[j]) + 1e-9 * depths[i]
            back[j][i] = arg
    i = min(range(n), key=lambda k: cost[cap - 1][k])
    picked = []
    for j in range(cap - 1, -1, -1):
        picked.append(i)
        i = back[j][i]
    return picked[::-1]


# ---- probing the model ---------------------------------------------------------------------------

def _validated(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """User-chosen exit names, checked and put in forward order, and the per-sample shapes of their outputs."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise unknown_module_error(name, modules)
    probe = _probe(model, x, list(dict.fromkeys(names)))
    for name in names:
        calls = probe.calls.get(name, 0)
        if calls != 1:
            times = "never" if calls == 0 else f"{calls} times"
            raise ValueError(f"module {name!r} is called {times} during forward, so it cannot be an exit")
        if name not in probe.shapes:
            raise ValueError(f"module {name!r} does not return a tensor, so it cannot be an exit")
    return probe.order, probe.shapes


@dataclass
class _Probe:
    order: list[str]  # probed names in order of their first call
    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...]]  # per-sample output shape, for names whose first call returned a tensor
    passthrough: set[str]  # names that returned their input tensor unmodified
    classes: int | None = None  # the model's number of outputs, when it returns [batch, classes]


def _probe(model: nn.Module, x: torch.Tensor, names: list[str]) -> _Probe:
    """Run ``model(x)`` in eval mode without grad, recording how each named module is called."""
    modules = dict(model.named_modules())
    probe = _Probe([], {}, {}, set())
    versions: dict[str, int | None] = {}

    def before(name, _module, args):
        # An in-place op returns its input too but bumps the version counter; only an untouched
        # input means a no-op.
        versions[name] = _version(args[0]) if args and isinstance(args[0], torch.Tensor) else None

    def after(name, _module, args, output):
        count = probe.calls[name] = probe.calls.get(name, 0) + 1
        if count > 1:
            return
        probe.order.append(name)
        if isinstance(output, torch.Tensor):
            probe.shapes[name] = tuple(output.shape[1:])
            if args and output is args[0] and _version(output) == versions[name]:
                probe.passthrough.add(name)

    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: before(name, m, a)))
            handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: after(name, m, a, o)))
        model.eval()
        with torch.no_grad():
            output = model(x)
        if isinstance(output, torch.Tensor) and output.ndim == 2:
            probe.classes = int(output.shape[1])
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return probe


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version
