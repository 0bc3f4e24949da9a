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


@dataclass
class CertifiedFamily:
    """The one-parameter family of cascades that fit certified: ``threshold = 1 - s * (1 - shape)``.

    ``shape`` holds the designed relative threshold of each exit of the family (exits outside it never
    fire); ``scale`` is the point that passed the certification test (None: no point passed, so the
    backbone answers alone). Smaller scales are stricter (s = 0: no exit fires), so moving ``s`` toward 0
    can only lower the agreement drop; a live guard walks ``scales`` this way when traffic drifts.
    """

    shape: dict[str, float]
    scale: float | None
    scales: list[float]
    tolerance: float
    delta: float

    def thresholds(self, scale: float) -> dict[str, float]:
        """The family member at ``scale``, as {layer: threshold}."""
        return {layer: 1.0 - scale * (1.0 - th) for layer, th in self.shape.items()}

    def stricter(self, scale: float) -> float:
        """The next point of the family below ``scale`` (0 stays 0)."""
        below = [s for s in self.scales if s < scale - 1e-12]
        return max(below) if below else 0.0

    def looser(self, scale: float, limit: float | None = None) -> float:
        """The next point above ``scale``, never past ``limit`` (default: the certified scale)."""
        cap = self.scale if limit is None else limit
        above = [s for s in self.scales if scale + 1e-12 < s <= (cap if cap is not None else 0.0) + 1e-12]
        return min(above) if above else scale

    def to_dict(self) -> dict:
        return {"shape": dict(self.shape), "scale": self.scale, "scales": list(self.scales),
                "tolerance": self.tolerance, "delta": self.delta}

    @classmethod
    def from_dict(cls, raw: dict) -> "CertifiedFamily":
        return cls({str(k): float(v) for k, v in raw["shape"].items()},
                   None if raw.get("scale") is None else float(raw["scale"]),
                   [float(s) for s in raw["scales"]], float(raw["tolerance"]), float(raw["delta"]))
