"""The backbone's ``torch.fx`` graph as selfxit reads it: what is data, where exits can cut it, and how a
forward that reads the batch size before an exit keeps working after the batch shrank.

What counts as data: the model's first input and everything computed from it, except *shape values*
(``x.size()``, ``x.shape``, ``x.dim()``... and whatever is computed from those alone, e.g. ``bs * 2`` or
``torch.zeros(bs, 1)``). Dropping rows changes only the batch component of a shape, so a read of the
batch size is not data flow: :func:`batch_safe_module` recomputes it from the running tensor after an
exit. Optional forward arguments (``attn_mask=None``, ``is_causal=False``) are held at their defaults.
An articulation point (:func:`articulation_modules`) is a node that every data edge crossing the cut
just after it starts from, attributed to the outermost named module whose forward returns it.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

# Reads of a tensor's shape, not of its values (torch.fx records ``x.shape`` as ``getattr(x, 'shape')``).
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_BATCH_FREE = frozenset({"dim", "ndimension", "ndim", "dtype", "device", "is_cuda"})  # same for any batch
DATA, SHAPE, CONSTANT = "data", "shape", "constant"


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with some named submodules kept as single ``call_module`` nodes (leaves)."""

    def __init__(self, leaves: frozenset[str] = frozenset()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def constant_arguments(model: nn.Module) -> dict[str, Any]:
    """The optional arguments of ``model.forward`` with their defaults: traced as constants, not as inputs."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default for p in parameters[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
    }


def trace(model: nn.Module, leaves: frozenset[str] = frozenset()) -> fx.Graph:
    """The ``torch.fx`` graph of ``model`` in eval mode, optional arguments at their defaults, ``leaves``
    (qualified module names) not traced into. The model's training flags are restored; errors propagate."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # branches on self.training (e.g. stochastic depth) must take their inference path
        return _Tracer(leaves).trace(model, concrete_args=constant_arguments(model) or None)
    finally:
        for m, training in modes:
            m.training = training


def _is_shape_read(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return (node.op == "call_function" and node.target is getattr and len(node.args) >= 2
            and node.args[1] in _SHAPE_ATTRIBUTES)


def classify(graph: fx.Graph) -> dict[fx.Node, str]:
    """DATA, SHAPE or CONSTANT for each node, in graph order.

    The first placeholder is DATA (other placeholders are constants). A read of a DATA or SHAPE value's
    shape (``size``, ``shape``, ``dim``...) is SHAPE; any other node is DATA if one of its inputs is, else
    SHAPE if one of its inputs is, else CONSTANT.
    """
    kinds: dict[fx.Node, str] = {}
    first = True
    for node in graph.nodes:
        if node.op == "placeholder":
            kinds[node], first = (DATA if first else CONSTANT), False
            continue
        inputs = {kinds[arg] for arg in node.all_input_nodes}
        if _is_shape_read(node) and node.args and isinstance(node.args[0], fx.Node) and kinds[node.args[0]] != CONSTANT:
            kinds[node] = SHAPE
        else:
            kinds[node] = DATA if DATA in inputs else SHAPE if SHAPE in inputs else CONSTANT
    return kinds


def articulation_modules(model: nn.Module) -> list[tuple[str, int]]:
    """(qualified module name, depth) of every module ending at an articulation point, in forward order.

    The model is traced with :func:`trace`. A node is an articulation point when no DATA node
    (:func:`classify`) before it is used by a DATA node after it. It is attributed to the outermost named
    module, called once, whose last DATA node it is; nodes no submodule returns (functional ops in a
    forward) are dropped. Depth is the number of components in the name (``layer2`` is 1, ``layer2.3`` is
    2). No filter is applied here, and whether the output is a tensor is only checked by
    :func:`candidate_table`, which runs the model. Tracing errors propagate.
    """
    graph = trace(model)
    kinds = classify(graph)
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    dependent = [node for node in nodes if kinds[node] == DATA]
    return _attribute(dependent, position, kinds)


def _attribute(dependent: list[fx.Node], position: dict[fx.Node, int],
               kinds: dict[fx.Node, str]) -> list[tuple[str, int]]:
    """Articulation points among ``dependent`` (in order) mapped to the outermost module ending there."""
    ends: dict[str, fx.Node] = {}
    call_keys: dict[str, set[str]] = {}
    for node in dependent:
        for key, (name, _) in node.meta.get("nn_module_stack", {}).items():
            ends[name] = node
            call_keys.setdefault(name, set()).add(key)  # fx keys a module's n-th call "name@n"

    found = []
    reach = -1  # furthest use of any dependent node by a dependent node seen so far
    for node in dependent:
        if node.op not in ("placeholder", "output") and reach <= position[node]:
            for name, _ in node.meta.get("nn_module_stack", {}).values():  # outermost first
                if name and ends[name] is node and len(call_keys[name]) == 1:
                    found.append((name, name.count(".") + 1))
                    break
        uses = [position[user] for user in node.users if kinds[user] == DATA]
        reach = max([reach, position[node], *uses])
    return found


# ---- batch-size reads after an exit --------------------------------------------------------------

def _rebatched(shape: torch.Size, running: torch.Tensor) -> torch.Size:
    """A shape read before an exit, with its batch component replaced by the batch size of ``running``."""
    return torch.Size((running.shape[0], *shape[1:]))


def _batch_size(running: torch.Tensor) -> int:
    """The batch size of ``running`` (the output of the last exit: the rows still running)."""
    return running.shape[0]


def _rebatched_dim(tensor: torch.Tensor, running: torch.Tensor, dim: int) -> int:
    """``tensor.size(dim)`` read before an exit, as it reads on the rows of ``running``."""
    return running.shape[0] if dim % tensor.dim() == 0 else tensor.size(dim)


def batch_safe_module(model: nn.Module, exit_names: list[str]) -> nn.Module:
    """``model``, or a ``torch.fx.GraphModule`` that computes the same where shrinking at ``exit_names``
    would otherwise break: a forward that reads the batch size before an exit (``bs = x.size(0)``) and uses
    it after (``x.view(bs, -1)``).

    The graph is traced with the exits as leaf modules (the GraphModule calls the same module objects,
    so hooks on them fire). Every shape value used after an exit but read from a tensor made before it is
    recomputed just before its use, with the batch size read from the exit's output (the running rows);
    other dimensions are read as before. Where nothing needs recomputing, or the model cannot be traced,
    ``model`` itself is returned. The GraphModule holds the model's own submodules and parameters (not
    copies), and follows the branches the model takes in eval mode.
    """
    names = frozenset(exit_names)
    if not names:
        return model
    try:
        graph = trace(model, names)
    except Exception:  # untraceable: hooks on the model itself are all there is
        return model
    kinds = classify(graph)
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    exits = [node for node in nodes if node.op == "call_module" and node.target in names]
    if not exits or SHAPE not in kinds.values():
        return model

    def last_exit_before(node: fx.Node) -> fx.Node | None:
        before = [e for e in exits if position[e] < position[node]]
        return before[-1] if before else None

    changed = False
    for user in nodes:
        if kinds[user] != DATA or not any(kinds[a] == SHAPE for a in user.all_input_nodes):
            continue
        running = last_exit_before(user)
        if running is None:
            continue
        copies: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(user):
            for arg in [a for a in user.all_input_nodes if kinds[a] == SHAPE]:
                fresh = _recompute(arg, running, position, kinds, copies, graph)
                if fresh is not arg:
                    user.replace_input_with(arg, fresh)
                    changed = True
    if not changed:
        return model
    graph.lint()
    # Not .eval(): that would reach the shared submodules; the graph was traced on the inference branches.
    return fx.GraphModule(model, graph, class_name=f"BatchSafe{type(model).__name__}")


def _recompute(node: fx.Node, running: fx.Node, position: dict[fx.Node, int], kinds: dict[fx.Node, str],
               copies: dict[fx.Node, fx.Node], graph: fx.Graph) -> fx.Node:
    """``node`` (a SHAPE value) recomputed at the insertion point for the rows of ``running``, or ``node``
    itself where none of its shape reads sees a tensor from before ``running``."""
    if node in copies:
        return copies[node]
    result = node
    if _is_shape_read(node):
        source = node.args[0]
        assert isinstance(source, fx.Node)
        stale_source = kinds[source] == DATA and position[source] < position[running]
        if kinds[source] == SHAPE:
            fresh_source = _recompute(source, running, position, kinds, copies, graph)
            if fresh_source is not source:
                result = graph.node_copy(node, lambda a: fresh_source if a is source else a)
        elif stale_source and not _batch_free(node):
            dim = None  # getattr(x, "shape")
            if node.op == "call_method":  # x.size(...)
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None:  # x.shape, x.size()
                result = graph.call_function(_rebatched, (node, running))
            elif isinstance(dim, int) and dim >= 0:  # x.size(0) is the batch size, x.size(1) is not
                result = graph.call_function(_batch_size, (running,)) if dim == 0 else node
            else:  # x.size(-4): the batch if it counts back to dimension 0
                result = graph.call_function(_rebatched_dim, (source, running, dim))
    else:
        inputs = {a: _recompute(a, running, position, kinds, copies, graph)
                  for a in node.all_input_nodes if kinds[a] == SHAPE}
        if any(fresh is not a for a, fresh in inputs.items()):
            result = graph.node_copy(node, lambda a: inputs.get(a, a))
    copies[node] = result
    return result


def _batch_free(node: fx.Node) -> bool:
    """Whether a shape read is the same for any batch size (``dim()``, ``dtype``...)."""
    return (node.target if node.op == "call_method" else node.args[1]) in _BATCH_FREE
