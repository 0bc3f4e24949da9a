"""Candidate exit layers of a frozen classifier, found automatically.

An exit can sit after a module only if the rest of the forward pass depends on that module's output
tensor alone: then an exit head can read it, and a forward hook can shrink the batch to the samples that
did not exit by returning a slice of it. In the ``torch.fx`` graph such points are articulation points:
nodes that every input-dependent edge crossing the cut just after them starts from. Each one is
attributed to the outermost named module whose forward returns it, filtered like the SelfXit paper
does (no inference no-ops, not the final two layers, first-level components first) and described by
its per-sample activation shape and the backbone FLOPs that remain after it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from selfxit.core.flops import cumulative_flops, unknown_module_error

# Modules that leave a tensor unchanged at inference; an exit after one would duplicate its input's exit.
_NO_OP_TYPES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity, nn.Flatten,
)


@dataclass(frozen=True)
class Candidate:
    """A layer after which an exit can be installed.

    Attributes:
        name: qualified module name, hookable via ``dict(model.named_modules())[name]``.
        shape: activation shape for one sample, without the batch dimension.
        remaining_flops: backbone FLOPs after this layer, per sample (see ``selfxit.core.flops``).
    """

    name: str
    shape: tuple[int, ...]
    remaining_flops: int

    def to_dict(self) -> dict:
        """JSON-friendly form: ``{"name", "shape" (a list), "remaining_flops"}``."""
        return {"name": self.name, "shape": list(self.shape), "remaining_flops": self.remaining_flops}


def find_candidates(
    model: nn.Module, example_input: torch.Tensor, max_candidates: int = 10, names: list[str] | None = None
) -> list[Candidate]:
    """Candidate exit layers of ``model`` in forward order, at most ``max_candidates`` of them.

    Without ``names`` the candidates are the modules returned by :func:`articulation_modules`, minus
    inference no-ops (dropout, identity, flatten, or any module returning its input unchanged) and modules
    that do not run exactly once or do not return a tensor, minus the last two remaining (pooling and
    classifier) and anything after them (see ``_without_head``), then picked shallowest first: all
    top-level children, then depth-2 modules, and so on; a level that does not fit whole is sampled
    evenly in forward order. If the model cannot be traced by ``torch.fx``, its top-level children are
    used instead, with a warning.

    With ``names`` exactly those modules are described, in forward order, after checking that each exists,
    runs exactly once and returns a tensor (ValueError otherwise); no filter or cap applies.

    ``example_input`` is a batch; only ``example_input[:1]`` is run. The model is left as found.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    x = example_input[:1]
    chosen, shapes = _validated(model, x, names) if names is not None else _automatic(model, x, max_candidates)
    if not chosen:
        return []
    total, reached = cumulative_flops(model, example_input, chosen)
    return [Candidate(name, shapes[name], total - reached[name]) for name in chosen]


def articulation_modules(model: nn.Module) -> list[tuple[str, int]]:
    """(qualified module name, depth) of every module ending at an articulation point, in forward order.

    The model is traced with ``torch.fx`` (in eval mode). A node is an articulation point when no
    input-dependent node before it is used after it. It is attributed to the outermost named module, called
    once, whose last input-dependent node it is; nodes no submodule returns (functional ops in a forward)
    are dropped. Depth is the number of components in the name (``layer2`` is 1, ``layer2.3`` is 2).
    No filter is applied here, and whether the output is a tensor is only checked by :func:`find_candidates`,
    which runs the model. Tracing errors propagate.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # branches on self.training (e.g. stochastic depth) must take their inference path
        graph = fx.Tracer().trace(model)
    finally:
        for m, training in modes:
            m.training = training

    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    dependent: dict[fx.Node, None] = {}  # input-dependent nodes in order; parameters and constants are ignored
    for node in nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent[node] = None
    return _attribute(list(dependent), position)


def _attribute(dependent: list[fx.Node], position: dict[fx.Node, int]) -> list[tuple[str, int]]:
    """Articulation points among ``dependent`` (in order) mapped to the outermost module ending there."""
    ends: dict[str, fx.Node] = {}
    call_keys: dict[str, set[str]] = {}
    for node in dependent:
        for key, (name, _) in node.meta.get("nn_module_stack", {}).items():
            ends[name] = node
            call_keys.setdefault(name, set()).add(key)  # fx keys a module's n-th call "name@n"

    found = []
    reach = -1  # furthest use of any dependent node seen so far
    for node in dependent:
        if node.op not in ("placeholder", "output") and reach <= position[node]:
            for name, _ in node.meta.get("nn_module_stack", {}).values():  # outermost first
                if name and ends[name] is node and len(call_keys[name]) == 1:
                    found.append((name, name.count(".") + 1))
                    break
        reach = max([reach, position[node]] + [position[user] for user in node.users])
    return found


def _automatic(model: nn.Module, x: torch.Tensor, cap: int) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Filtered, capped candidate names in forward order, and the per-sample shapes of their outputs."""
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
    kept = [
        (name, depth)
        for name, depth in ranked
        if not isinstance(modules[name], _NO_OP_TYPES)
        and probe.calls.get(name) == 1
        and name in probe.shapes
        and name not in probe.passthrough
    ]
    return _shallow_first(_without_head(kept), cap), probe.shapes


def _without_head(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``entries`` (forward order) minus the last two layers, which end the network (pooling, classifier).

    The last two are taken at the shallowest depth present, together with everything after the earlier of
    them, so that layers inside the head (e.g. ``classifier.0`` of a two-layer classifier) go with it.
    Where that depth has a single entry (a wrapper around the real network), the last two of the flat list.
    """
    if not entries:
        return []
    shallowest = min(depth for _, depth in entries)
    top = [i for i, (_, depth) in enumerate(entries) if depth == shallowest]
    cut = min(len(entries) - 2, top[-2] if len(top) >= 2 else len(entries))
    return entries[: max(cut, 0)]


def _shallow_first(entries: list[tuple[str, int]], cap: int) -> list[str]:
    """Names from ``entries`` (forward order), shallowest levels first, a level that overflows sampled evenly."""
    chosen: set[str] = set()
    for depth in sorted({d for _, d in entries}):
        room = cap - len(chosen)
        if room <= 0:
            break
        level = [name for name, d in entries if d == depth]
        if len(level) > room:
            level = [level[(2 * k + 1) * len(level) // (2 * room)] for k in range(room)]  # centre of each bin
        chosen.update(level)
    return [name for name, _ in entries if name in chosen]


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
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return probe


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version
