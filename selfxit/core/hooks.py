"""Capturing layer outputs with forward hooks, and splitting a data batch into inputs and labels.

Recording the medial dataset, the evaluation and the report all run the frozen backbone once and
need what some of its layers returned; they all read batches that are either bare inputs or
``(inputs, labels, ...)``. Both are done here once, so the rules (hooks always removed, what counts
as a labelled batch) cannot drift apart between them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture(model: nn.Module, layer_names) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep the latest output of each named layer of ``model`` in the yielded dict.

    Why a context manager: a hook left behind would keep running (and holding tensors) on every
    later forward pass, including the early-exit runtime's own hooked passes; leaving the block
    removes them even when the forward pass raised. Unknown names fail before any hook is registered.
    """
    modules = dict(model.named_modules())
    names = list(layer_names)
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model")
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda _module, _inputs, output, name=name: store.__setitem__(name, output)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels or None)`` of a batch given as ``inputs`` or ``(inputs, labels, ...)``.

    Why strict: traffic is unlabelled by design, so a batch without a label tensor is normal (labels
    None), but anything that is not a tensor or a sequence starting with one is a caller's mistake and
    is refused with the type seen rather than failing later inside the model.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise TypeError(f"a batch must be a tensor or (inputs, labels[, ...]); got {type(batch).__name__}")
