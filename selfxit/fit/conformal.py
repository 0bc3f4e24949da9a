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
from typing import Callable, Union

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
    scores = {}
    for layer, probs in exit_probs.items():
        probs = np.asarray(probs, dtype=np.float64)
        targets = np.asarray(exit_targets[layer], dtype=np.int64)
        if probs.shape[:1] != targets.shape:
            raise ValueError(f"exit {layer!r}: {probs.shape[0]} probability rows for {len(targets)} targets")
        scores[layer] = 1.0 - probs[np.arange(len(targets)), targets] if len(targets) else np.zeros(0)
    return _from_scores(scores, alphas)


def _from_scores(scores: dict[str, np.ndarray], alphas) -> ConformalCalibration:
    """Quantiles per exit from each exit's nonconformity scores (``1 - p(backbone's class)``) of the
    calibration samples that left there: the one place both calibrations turn scores into quantiles."""
    alphas = [_check_alpha(a) for a in alphas]
    quantiles = {str(a): {layer: conformal_quantile(s, a) for layer, s in scores.items()} for a in alphas}
    return ConformalCalibration(alphas, quantiles, {layer: int(len(s)) for layer, s in scores.items()})


LogProbs = Union[torch.Tensor, Callable[[int, np.ndarray], torch.Tensor]]
"""Calibrated log-probabilities of a cascade's exits on one split: a [K, N, C] tensor, or a function
``(k, positions) -> [len(positions), C]`` that computes exit ``k``'s for those positions of the split (so a
fit need not hold K x N x C floats: see :func:`selfxit.fit.procedure.fit_exits`)."""

CHUNK = 1024  # rows scored at a time


def _rows_of(log_probs: LogProbs) -> Callable[[int, np.ndarray], torch.Tensor]:
    if callable(log_probs):
        return log_probs
    stacked = log_probs
    return lambda k, positions: stacked[k, torch.as_tensor(positions, dtype=torch.long)]


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


class _QualitySums:
    """Sums behind :class:`SetQuality`, added chunk by chunk."""

    def __init__(self):
        self.early = self.rows = 0
        self.covered_early = self.size_early = self.empty_early = self.covered_all = self.size_all = 0.0

    def add(self, sets: torch.Tensor, backbone_top1: torch.Tensor, exit: torch.Tensor) -> None:
        covered = sets[torch.arange(len(sets)), backbone_top1].double()
        size = sets.sum(1).double()
        early = exit != FINAL
        self.rows += len(sets)
        self.early += int(early.sum())
        self.covered_early += float(covered[early].sum())
        self.size_early += float(size[early].sum())
        self.empty_early += float((size[early] == 0).sum())
        self.covered_all += float(covered.sum())
        self.size_all += float(size.sum())

    def quality(self, alpha: float) -> SetQuality:
        nan = float("nan")
        e, n = self.early, self.rows
        return SetQuality(float(alpha), self.covered_early / e if e else nan, self.size_early / e if e else nan,
                          self.empty_early / e if e else nan, self.covered_all / n if n else nan,
                          self.size_all / n if n else nan, e)


def set_quality(sets: torch.Tensor, backbone_top1: torch.Tensor, exit: torch.Tensor, alpha: float) -> SetQuality:
    """Coverage and size of prediction ``sets`` [N, C] against the backbone's top-1."""
    sums = _QualitySums()
    sums.add(sets, backbone_top1, exit)
    return sums.quality(alpha)


def calibrate_cascade(layers: list[str], active: list[int], log_probs: LogProbs, taken: np.ndarray,
                      backbone_top1: torch.Tensor, alphas=ALPHAS) -> ConformalCalibration:
    """:func:`calibrate` from recorded predictions of a cascade on the calibration split.

    ``log_probs``: calibrated log-probabilities of the exits ``layers`` (:data:`LogProbs`); ``active``: indices
    of the cascade's exits; ``taken`` [N]: each sample's exit index (-1: the backbone), as from
    :func:`selfxit.fit.select.exit_assignment`. Only each sample's own exit is scored, ``CHUNK`` rows at a time.
    """
    of = _rows_of(log_probs)
    taken = np.asarray(taken)
    top1 = np.asarray(backbone_top1)
    scores = {}
    for k in active:
        rows = np.flatnonzero(taken == k)
        parts = [1.0 - of(k, part).exp().double().numpy()[np.arange(len(part)), top1[part]]
                 for part in (rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK))]
        scores[layers[k]] = np.concatenate(parts) if parts else np.zeros(0)
    return _from_scores(scores, alphas)


def cascade_set_quality(calibration: ConformalCalibration, layers: list[str], active: list[int],
                        log_probs: LogProbs, taken: np.ndarray | torch.Tensor, backbone_top1: torch.Tensor,
                        alphas=None) -> dict[str, SetQuality]:
    """:class:`SetQuality` per alpha of a cascade's sets on recorded predictions of held-back samples
    (arguments as for :func:`calibrate_cascade`), ``CHUNK`` rows at a time."""
    of = _rows_of(log_probs)
    taken = np.asarray(taken).astype(np.int64)
    top1 = torch.as_tensor(np.asarray(backbone_top1), dtype=torch.long)
    position = {k: i for i, k in enumerate(active)}
    alphas = calibration.alphas if alphas is None else alphas
    quantiles = {a: calibration.quantile_vector(a, [layers[k] for k in active]) for a in alphas}
    sums = {a: _QualitySums() for a in alphas}
    for start in range(0, len(taken), CHUNK):
        chunk = taken[start:start + CHUNK]
        target = top1[start:start + CHUNK]
        exit = torch.tensor([position[int(k)] if k >= 0 else FINAL for k in chunk], dtype=torch.long)
        probabilities = None
        for k in np.unique(chunk[chunk >= 0]):
            at = np.flatnonzero(chunk == k)
            p = of(int(k), start + at).exp()
            if probabilities is None:
                probabilities = torch.zeros(len(chunk), p.shape[1])
            probabilities[torch.as_tensor(at)] = p
        if probabilities is None:  # nothing left early in this chunk: every set is the backbone's answer
            probabilities = torch.zeros(len(chunk), int(target.max()) + 1 if len(target) else 1)
        predictions = torch.where(exit != FINAL, probabilities.argmax(1), target)
        for a in alphas:
            sums[a].add(prediction_sets(probabilities, exit, predictions, quantiles[a]), target, exit)
    return {str(float(a)): sums[a].quality(a) for a in alphas}
