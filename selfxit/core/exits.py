"""One record per exit: the head at a backbone layer and everything the runtime and a bundle need about it."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(eq=False)
class ExitRecord:
    """An exit head on one backbone layer.

    ``threshold`` is None for a head that was trained but is not in the cascade. Without a ``gate`` the
    threshold applies to the calibrated max-softmax (head logits / ``temperature``); with a gate (see
    :mod:`selfxit.fit.gates`) it applies to the gate's score. ``head_flops`` is the head's cost per sample
    (the gate's few FLOPs are counted by :func:`selfxit.evaluate.evaluation.cost_per_exit`); ``spec`` is
    the JSON head spec that rebuilds ``head`` (:func:`selfxit.core.heads.build_head`) for activations of
    per-sample ``shape``.
    """

    layer: str
    head: nn.Module
    temperature: float = 1.0
    threshold: float | None = None
    gate: nn.Module | None = None
    spec: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    head_flops: int = 0

    @property
    def active(self) -> bool:
        """Whether the exit is part of the cascade that runs."""
        return self.threshold is not None
