"""What ``fit`` reports: per-head quality, the chosen cascade, and how other methods compare."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from selfxit.fit import select
from selfxit.fit.conformal import SetQuality


@dataclass
class HeadReport:
    """How one candidate's head turned out (agreement and ECE on the val split)."""

    layer: str
    head_flops: int
    remaining_flops: int
    agreement: float
    temperature: float
    ece_before: float
    ece_after: float
    kept: bool
    stored_bytes: int | None = None  # bytes per recorded row the medial store keeps for this candidate


@dataclass
class CascadeSummary:
    """A cascade's numbers on one split, computed from recorded predictions."""

    exits: list[str]
    thresholds: list[float]
    flops_fraction: float
    agreement: float
    exit_rates: list[float]


@dataclass
class FitReport:
    """What ``fit`` did: per-head quality, the chosen cascade, and how other methods compare."""

    tolerance: float
    method: str
    confidence_level: float
    heads: list[HeadReport]
    chosen_val: CascadeSummary
    chosen_test: CascadeSummary | None
    baselines: dict[str, dict[str, CascadeSummary]] = field(default_factory=dict)  # method -> split -> summary
    gate: str = "confidence"  # what the thresholds apply to: max-softmax or learned gate outputs
    gate_config: dict | None = None
    prediction_sets: dict[str, SetQuality] = field(default_factory=dict)  # str(alpha) -> test split
    conformal_split: str = "tune"  # the samples the prediction sets were calibrated on


def summary(stats: select.ExitStats, thresholds: np.ndarray, layers: list[str]) -> CascadeSummary:
    """The cascade ``thresholds`` (over ``layers``) summarised on the split ``stats`` holds."""
    r = select.evaluate_cascade(stats, thresholds)
    active = r.active
    return CascadeSummary([layers[k] for k in active], [float(thresholds[k]) for k in active], r.flops_fraction,
                          1.0 - r.drop, [float(r.exit_rates[k]) for k in active])
