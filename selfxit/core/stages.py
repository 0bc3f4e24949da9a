"""The backbone cut at its active exits into stages: one module from each exit's tensor to the next.

Why stages: a CUDA graph or a compiled function covers a fixed piece of work with fixed shapes, and the
hook runtime has none to offer (the backbone runs as one forward, shrinking inside hooks). Cut at the
exits, the backbone becomes ``stage_0(x) -> exit_0's tensor``, ``stage_k(exit_{k-1}'s tensor) -> exit_k's
tensor``, ..., ``stage_last -> logits``, and each stage can be compiled or captured per bucket on its own.

An exit layer is an articulation point of the traced graph (:mod:`selfxit.core.candidates`): nothing after
it reads a tensor from before it, so each stage needs only its input tensor, the model's parameters and
constants. The stages are ``torch.fx.GraphModule`` s over the model's own submodules and parameters (not
copies): run one after the other at the same batch, they compute exactly what the backbone computes.
A forward that reads the batch size before an exit and uses it after (``bs = x.size(0)`` ... ``x.view(bs, -1)``,
as EfficientNet-Lite does) is cut from its batch-safe graph (:func:`selfxit.core.graph.batch_safe_module`), where
such reads are recomputed from the exit's output, so each stage reads the batch size of its own input.
"""
from __future__ import annotations

from torch import fx, nn

from selfxit.core.graph import CONSTANT, batch_safe_module, classify, trace


class StageError(ValueError):
    """The backbone cannot be cut into stages at these exits (the bucketed runtime is then unavailable)."""


def split_stages(model: nn.Module, exit_layers: list[str]) -> list[fx.GraphModule]:
    """``len(exit_layers) + 1`` stages of ``model`` (eval-mode trace), cut after each exit layer.

    Raises :class:`StageError` when the model cannot be traced, an exit layer is not called exactly once, the
    exits are not in forward order, or a stage would read a value computed before its input (a batch-size
    read made before an exit and used after it, e.g. ``bs = x.size(0)`` ... ``x.view(bs, -1)``: the hook
    runtime handles those models).
    """
    safe = batch_safe_module(model, list(exit_layers)) if exit_layers else model
    root: nn.Module = model
    if isinstance(safe, fx.GraphModule) and safe is not model:
        graph, root = safe.graph, safe  # batch-size reads recomputed after each exit
    else:
        try:
            graph = trace(model, frozenset(exit_layers))
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: no stages for this model
            raise StageError(f"cannot trace {type(model).__name__} to cut it into stages: {exc}") from exc
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    kinds = classify(graph)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    result = outputs[0].args[0] if outputs else None
    if not placeholders or not isinstance(result, fx.Node):
        raise StageError(f"{type(model).__name__}'s forward must take one tensor and return one tensor of logits")
    boundaries = []
    for layer in exit_layers:
        calls = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if len(calls) != 1:
            raise StageError(f"exit layer {layer!r} is called {len(calls)} times in the traced forward; need once")
        boundaries.append(calls[0])
    if [position[b] for b in boundaries] != sorted(position[b] for b in boundaries):
        raise StageError(f"exit layers {exit_layers} are not in forward order")
    starts, ends = [placeholders[0], *boundaries], [*boundaries, result]
    return [_stage(root, start, end, position, kinds, k) for k, (start, end) in enumerate(zip(starts, ends))]


def _stage(model: nn.Module, start: fx.Node, end: fx.Node, position: dict[fx.Node, int],
           kinds: dict[fx.Node, str], index: int) -> fx.GraphModule:
    """The GraphModule computing ``end`` from ``start`` (copies of the nodes ``end`` depends on)."""
    needed: set[fx.Node] = set()
    todo = [end]
    while todo:
        node = todo.pop()
        if node in needed or node is start:
            continue
        if position[node] < position[start] and kinds[node] != CONSTANT:
            raise StageError(f"stage {index} (after {start.name}) reads {node.name}, computed before its input: "
                             "the model reuses a value across an exit (e.g. a batch size read before it)")
        if node.op == "placeholder":
            raise StageError(f"stage {index} reads the model input {node.name} after an exit")
        needed.add(node)
        todo.extend(node.all_input_nodes)
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}
    for node in sorted(needed, key=position.__getitem__):
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[end])
    graph.lint()
    return fx.GraphModule(model, graph, class_name=f"Stage{index}")
