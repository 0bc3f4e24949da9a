"""Split-conformal prediction sets for early answers: sets of classes that contain the backbone's answer.

For each active exit, the nonconformity of a calibration sample that leaves there is
``1 - p(backbone's class)`` under the exit's calibrated softmax. With ``n`` such samples and ``q`` the
``ceil((n + 1)(1 - alpha))``-th smallest score, the set ``{c : p_c >= 1 - q}`` contains the backbone's
answer with probability at least ``1 - alpha`` for a new sample leaving at that exit (split conformal,
Vovk et al.; calibrated per exit, so the promise holds per exit and hence over all early answers).
Too few calibration samples for a finite quantile give the set of all classes. Samples answered by
the backbone itself get ``{its answer}``, which always contains it.

The sets may be empty: with an exit that already agrees more often than ``1 - alpha``, an exact
``1 - alpha`` coverage leaves some samples without a set.
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


def calibrate(exit_probs: dict[str, np.ndarray], exit_targets: dict[str, np.ndarray],
              alphas=ALPHAS) -> ConformalCalibration:
    """Quantiles per exit from the calibration samples that left there.

    ``exit_probs[layer]`` [n, C]: the exit's calibrated probabilities for those samples;
    ``exit_targets[layer]`` [n]: the backbone's top-1 for them.
    """
    alphas = [_check_alpha(a) for a in alphas]
    quantiles: dict[str, dict[str, float]] = {str(a): {} for a in alphas}
    counts = {}
    for layer, probs in exit_probs.items():
        probs = np.asarray(probs, dtype=np.float64)
        targets = np.asarray(exit_targets[layer], dtype=np.int64)
        if probs.shape[:1] != targets.shape:
            raise ValueError(f"exit {layer!r}: {probs.shape[0]} probability rows for {len(targets)} targets")
        scores = 1.0 - probs[np.arange(len(targets)), targets] if len(targets) else np.zeros(0)
        counts[layer] = int(len(targets))
        for a in alphas:
            quantiles[str(a)][layer] = conformal_quantile(scores, a)
    return ConformalCalibration(alphas, quantiles, counts)


def prediction_sets(probabilities: torch.Tensor, exit: torch.Tensor, predictions: torch.Tensor,
                    quantiles: torch.Tensor) -> torch.Tensor:
    """[B, C] bool sets: ``p_c >= 1 - q`` of the sample's exit, or the backbone's answer alone (FINAL)."""
    early = exit != FINAL
    q = quantiles.to(probabilities.device)[exit.clamp_min(0)] if len(quantiles) else torch.zeros(len(exit))
    sets = (1.0 - probabilities) <= q[:, None]
    answer = torch.nn.functional.one_hot(predictions, probabilities.shape[1]).bool()
    return torch.where(early[:, None], sets, answer)


@dataclass
class SetQuality:
    """Empirical coverage (set contains the backbone's answer) and mean set size on a set of samples."""

    alpha: float
    coverage_early: float  # over samples answered by an exit (the promise: >= 1 - alpha)
    mean_size_early: float
    empty_early: float  # fraction of empty sets among early answers
    coverage_all: float  # incl. samples answered by the backbone (always covered, size 1)
    mean_size_all: float
    early_samples: int


def set_quality(sets: torch.Tensor, backbone_top1: torch.Tensor, exit: torch.Tensor, alpha: float) -> SetQuality:
    """Coverage and size of prediction ``sets`` [N, C] against the backbone's top-1."""
    covered = sets[torch.arange(len(sets)), backbone_top1].float()
    size = sets.sum(1).float()
    early = exit != FINAL
    nan = float("nan")

    def mean(values, mask):
        return float(values[mask].mean()) if mask.any() else nan

    return SetQuality(float(alpha), mean(covered, early), mean(size, early), mean((size == 0).float(), early),
                      float(covered.mean()) if len(sets) else nan, float(size.mean()) if len(sets) else nan,
                      int(early.sum()))


def calibrate_cascade(layers: list[str], active: list[int], log_probs: torch.Tensor, taken: np.ndarray,
                      backbone_top1: torch.Tensor, alphas=ALPHAS) -> ConformalCalibration:
    """:func:`calibrate` from recorded predictions of a cascade on the calibration split.

    ``log_probs`` [K, N, C]: calibrated log-probabilities of the exits ``layers``; ``active``: indices of the
    cascade's exits; ``taken`` [N]: each sample's exit index (-1: the backbone), as from
    :func:`selfxit.fit.select.exit_assignment`.
    """
    taken = np.asarray(taken)
    top1 = np.asarray(backbone_top1)
    probs, targets = {}, {}
    for k in active:
        rows = np.flatnonzero(taken == k)
        probs[layers[k]] = log_probs[k, torch.as_tensor(rows, dtype=torch.long)].exp().numpy()
        targets[layers[k]] = top1[rows]
    return calibrate(probs, targets, alphas)


def cascade_set_quality(calibration: ConformalCalibration, layers: list[str], active: list[int],
                        log_probs: torch.Tensor, taken: np.ndarray, backbone_top1: torch.Tensor,
                        alphas=None) -> dict[str, SetQuality]:
    """:class:`SetQuality` per alpha of a cascade's sets on recorded predictions of held-back samples
    (arguments as for :func:`calibrate_cascade`)."""
    taken = torch.as_tensor(np.asarray(taken), dtype=torch.long)
    top1 = torch.as_tensor(np.asarray(backbone_top1), dtype=torch.long)
    position = {k: i for i, k in enumerate(active)}
    exit = torch.tensor([position[int(k)] if k >= 0 else FINAL for k in taken], dtype=torch.long)
    n, classes = len(taken), log_probs.shape[2] if log_probs.ndim == 3 else 0
    probabilities = torch.zeros(n, classes)
    early = taken >= 0
    if early.any():
        probabilities[early] = log_probs[taken[early], torch.nonzero(early).flatten()].exp()
    predictions = torch.where(early, probabilities.argmax(1) if classes else top1, top1)
    out = {}
    for alpha in calibration.alphas if alphas is None else alphas:
        q = calibration.quantile_vector(alpha, [layers[k] for k in active])
        out[str(float(alpha))] = set_quality(prediction_sets(probabilities, exit, predictions, q), top1, exit, alpha)
    return out
