"""Conformal prediction sets at run time: the calibrated quantiles and the sets they give.

How the quantiles are calibrated, and what they promise, is in :mod:`selfxit.fit.conformal`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from selfxit.core.runtime import FINAL

ALPHAS = (0.01, 0.05, 0.1)


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for 95% coverage; got {alpha}")
    return float(alpha)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile of nonconformity ``scores`` at level ``1 - alpha`` (1.0 when too few)."""
    alpha = _check_alpha(alpha)
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    return 1.0 if rank > len(scores) else float(scores[rank - 1])


@dataclass
class ConformalCalibration:
    """Per-exit conformal quantiles for a few alphas (keys of ``quantiles`` are ``str(alpha)``)."""

    alphas: list[float]
    quantiles: dict[str, dict[str, float]]  # str(alpha) -> layer -> q
    counts: dict[str, int]  # layer -> calibration samples that left there

    def quantile_vector(self, alpha: float, layers: list[str]) -> torch.Tensor:
        """[exits] quantiles of the given active exits at ``alpha``; ValueError for an uncalibrated alpha."""
        key = str(float(alpha))
        if key not in self.quantiles:
            raise ValueError(f"prediction sets are calibrated for alpha in {self.alphas}; got {alpha}")
        missing = [layer for layer in layers if layer not in self.quantiles[key]]
        if missing:
            raise ValueError(f"no conformal calibration for exits {missing}; refit to calibrate them")
        return torch.tensor([self.quantiles[key][layer] for layer in layers], dtype=torch.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ConformalCalibration":
        return cls([float(a) for a in raw["alphas"]], {k: dict(v) for k, v in raw["quantiles"].items()},
                   {k: int(v) for k, v in raw["counts"].items()})


def prediction_sets(probabilities: torch.Tensor, exit: torch.Tensor, predictions: torch.Tensor,
                    quantiles: torch.Tensor) -> torch.Tensor:
    """[B, C] bool sets: ``p_c >= 1 - q`` of the sample's exit, or the backbone's answer alone (FINAL)."""
    early = exit != FINAL
    q = quantiles.to(probabilities.device)[exit.clamp_min(0)] if len(quantiles) else torch.zeros(len(exit))
    sets = (1.0 - probabilities) <= q[:, None]
    answer = torch.nn.functional.one_hot(predictions, probabilities.shape[1]).bool()
    return torch.where(early[:, None], sets, answer)
