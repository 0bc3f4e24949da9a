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

from dataclasses import dataclass

import numpy as np
import torch

from selfxit.core.conformal import (
    ALPHAS,
    ConformalCalibration,
    _check_alpha,
    conformal_quantile,
    prediction_sets,
)
from selfxit.core.runtime import FINAL


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
                        log_probs: torch.Tensor, taken: np.ndarray | torch.Tensor, backbone_top1: torch.Tensor,
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
