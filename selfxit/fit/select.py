"""Choose which exits to keep and their confidence thresholds under an agreement tolerance.

Everything here works on recorded predictions (no model is run). For ``K`` candidate exits and
``N`` samples the inputs are ``confidence[K, N]`` (calibrated max-softmax of each head) and
``agree[K, N]`` (head top-1 == backbone top-1), plus per-exit FLOPs: ``head_flops[k]`` (C1) and
``remaining_flops[k]`` (C2, backbone FLOPs after that layer).

A cascade is an ordered subset of exits with one threshold each; a sample leaves at the first
exit whose confidence reaches its threshold. Its *agreement drop* (the risk) is the fraction of
all samples that leave early with a different answer than the backbone: samples that exit
nowhere get the backbone's own answer, so they never count.

Three optimizers:
- :func:`paper_thresholds` + :func:`best_subset`: SelfXit's rule (per exit ``n``, the largest
  coverage whose drop stays within ``T / 2**n``) and eq. 4's subset score, exhaustive up to
  :data:`EXHAUSTIVE_LIMIT` candidates and greedy forward selection beyond.
- :func:`joint_path`: tunes all thresholds together by coordinate descent on
  ``cost + lambda * drop`` for a sweep of ``lambda``; "off" is a threshold, so it also picks the
  subset. It starts from the paper's solution, so it never saves less at the same tolerance.
- :func:`certify`: the finite-sample correction. Thresholds chosen on one set of samples are
  tested in a fixed sequence (Learn-then-Test, Angelopoulos et al. 2021) on a second, untouched
  set with an exact binomial test; the most aggressive cascade accepted before the first failure
  is kept. With probability at least ``1 - delta`` over the certification samples, its drop on
  unseen traffic from the same distribution is at most the tolerance.
- :func:`certified_cascade`: what ``fit`` uses by default. The joint optimizer designs the cascade's
  shape on the design samples (at 1.5 times the tolerance); the sequence tested is that shape scaled
  from strict to loose (:func:`scaled_path`). A one-parameter, monotone family keeps the fixed
  sequence from stopping early on noise, which a path of independently tuned cascades does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy.stats import binom

EXHAUSTIVE_LIMIT = 16
OFF = np.inf  # a threshold that never fires
DESIGN_FACTORS = (1.0, 1.25, 1.5, 2.0)  # multiples of the tolerance the shape is designed at (best one kept)


@dataclass
class ExitStats:
    """Recorded validation predictions of every candidate exit, in forward order."""

    confidence: np.ndarray  # [K, N] float
    agree: np.ndarray  # [K, N] bool
    head_flops: np.ndarray  # [K] C1
    remaining_flops: np.ndarray  # [K] C2
    total_flops: float  # backbone FLOPs per sample

    def __post_init__(self):
        self.confidence = np.asarray(self.confidence, dtype=np.float64)
        self.agree = np.asarray(self.agree, dtype=bool)
        self.head_flops = np.asarray(self.head_flops, dtype=np.float64)
        self.remaining_flops = np.asarray(self.remaining_flops, dtype=np.float64)
        if self.confidence.shape != self.agree.shape or self.confidence.ndim != 2:
            raise ValueError(f"confidence {self.confidence.shape} and agree {self.agree.shape} must both be [K, N]")
        k = self.confidence.shape[0]
        if self.head_flops.shape != (k,) or self.remaining_flops.shape != (k,):
            raise ValueError(f"head_flops and remaining_flops need one value per exit ({k})")

    @property
    def num_exits(self) -> int:
        return self.confidence.shape[0]

    def subset(self, samples: np.ndarray) -> "ExitStats":
        """The same exits on a subset of the samples."""
        return ExitStats(self.confidence[:, samples], self.agree[:, samples], self.head_flops,
                         self.remaining_flops, self.total_flops)


@dataclass
class CascadeResult:
    """What a cascade does on a set of samples."""

    thresholds: np.ndarray  # [K], OFF for exits not in the cascade
    flops_fraction: float  # mean FLOPs per sample incl. heads / backbone FLOPs
    drop: float  # fraction of samples leaving early with a different answer
    exit_rates: np.ndarray  # [K] fraction of samples leaving at each exit
    errors: int = 0  # number of drop events (drop * N)

    @property
    def active(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(np.isfinite(self.thresholds))]


def exit_assignment(stats: ExitStats, thresholds: np.ndarray) -> np.ndarray:
    """Index of the exit each sample leaves at, or -1 where it exits nowhere."""
    taken = np.full(stats.confidence.shape[1], -1)
    for k in np.flatnonzero(np.isfinite(thresholds)):
        fire = (taken < 0) & (stats.confidence[k] >= thresholds[k])
        taken[fire] = k
    return taken


def evaluate_cascade(stats: ExitStats, thresholds: np.ndarray) -> CascadeResult:
    """FLOPs fraction, agreement drop and exit rates of one cascade (OFF = exit not used)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n = stats.confidence.shape[1]
    taken, cost, wrong = _per_sample(stats, thresholds)
    rates = np.bincount(taken[taken >= 0], minlength=stats.num_exits) / n
    return CascadeResult(thresholds, float(cost.mean()), float(wrong.mean()), rates,
                         int(wrong.sum()))


def coverage_threshold(confidence: np.ndarray, agree: np.ndarray, budget: float) -> float:
    """Lowest threshold (largest coverage) whose drop ``mean(conf >= t and not agree)`` stays within budget."""
    order = np.argsort(-confidence, kind="stable")
    conf, wrong = confidence[order], ~agree[order]
    drop = np.cumsum(wrong) / len(conf)
    # Only cut between distinct confidence values: a threshold admits all ties.
    last_of_tie = np.append(conf[1:] != conf[:-1], True)
    ok = np.flatnonzero((drop <= budget + 1e-12) & last_of_tie)
    return float(conf[ok[-1]]) if len(ok) else OFF


def paper_thresholds(stats: ExitStats, subset: list[int], tolerance: float) -> np.ndarray:
    """SelfXit's rule: the n-th exit (1-based) of the subset gets the largest coverage whose drop <= T / 2**n."""
    thresholds = np.full(stats.num_exits, OFF)
    for n, k in enumerate(subset, start=1):
        thresholds[k] = coverage_threshold(stats.confidence[k], stats.agree[k], tolerance / 2**n)
    return thresholds


def subset_score(stats: ExitStats, thresholds: np.ndarray) -> float:
    """SelfXit eq. 4: K(S) = sum over exits of |hits| (C2 - C1) - |misses| C1, misses = reached but not exited."""
    taken = exit_assignment(stats, thresholds)
    score, reached = 0.0, np.ones(stats.confidence.shape[1], dtype=bool)
    for k in np.flatnonzero(np.isfinite(thresholds)):
        hits = reached & (taken == k)
        misses = reached & ~hits
        score += hits.sum() * (stats.remaining_flops[k] - stats.head_flops[k]) - misses.sum() * stats.head_flops[k]
        reached &= ~hits
    return float(score)


def best_subset(stats: ExitStats, tolerance: float, max_exits: int | None = None) -> np.ndarray:
    """Thresholds of the subset maximizing eq. 4 under the paper's rule (exhaustive, or greedy beyond 16)."""
    k_all = list(range(stats.num_exits))
    max_exits = stats.num_exits if max_exits is None else min(max_exits, stats.num_exits)
    if max_exits < 1:
        raise ValueError(f"max_exits must be >= 1; got {max_exits}")
    best, best_score = np.full(stats.num_exits, OFF), 0.0
    if stats.num_exits <= EXHAUSTIVE_LIMIT:
        for size in range(1, max_exits + 1):
            for subset in combinations(k_all, size):
                th = paper_thresholds(stats, list(subset), tolerance)
                score = subset_score(stats, th)
                if score > best_score:
                    best, best_score = th, score
        return best
    # Greedy forward selection: add the exit that raises K(S) most, stop when nothing helps.
    chosen: list[int] = []
    while len(chosen) < max_exits:
        trials = []
        for k in set(k_all) - set(chosen):
            grown = sorted(chosen + [k])
            th = paper_thresholds(stats, grown, tolerance)
            trials.append((subset_score(stats, th), grown, th))
        score, grown, th = max(trials, key=lambda t: t[0])
        if score <= best_score:
            break
        chosen, best, best_score = grown, th, score
    return best


def _grid(stats: ExitStats, points: int) -> list[np.ndarray]:
    """Candidate thresholds per exit: confidence quantiles (OFF is always tried as well)."""
    qs = np.linspace(0.0, 1.0, points)
    return [np.unique(np.quantile(c, qs)) for c in stats.confidence]


def _per_sample(stats: ExitStats, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's exit (-1: none), FLOPs (as a fraction of the backbone) and whether it leaves wrong."""
    n = stats.confidence.shape[1]
    taken = exit_assignment(stats, thresholds)
    if stats.num_exits == 0:
        return taken, np.ones(n), np.zeros(n, dtype=bool)
    spent_heads = np.cumsum(np.where(np.isfinite(thresholds), stats.head_flops, 0.0))
    cost_at = stats.total_flops - stats.remaining_flops + spent_heads
    cost = np.where(taken >= 0, cost_at[np.maximum(taken, 0)], stats.total_flops + spent_heads[-1])
    wrong = (taken >= 0) & ~stats.agree[np.maximum(taken, 0), np.arange(n)]
    return taken, cost / stats.total_flops, wrong


def _best_threshold(stats: ExitStats, th: np.ndarray, k: int, penalty: float, grid: np.ndarray) -> float:
    """Exact best threshold for exit k (from grid or OFF) with the others fixed, for all grid values at once."""
    without = th.copy()
    without[k] = OFF
    _, cost, wrong = _per_sample(stats, without)
    base = cost + penalty * wrong
    earlier = exit_assignment(stats, np.where(np.arange(stats.num_exits) < k, without, OFF))
    reach = earlier < 0
    head = stats.head_flops[k] / stats.total_flops
    heads_to_k = np.where(np.isfinite(without) & (np.arange(stats.num_exits) < k), stats.head_flops, 0.0).sum()
    exit_cost = (stats.total_flops - stats.remaining_flops[k] + heads_to_k + stats.head_flops[k]) / stats.total_flops
    exit_value = exit_cost + penalty * ~stats.agree[k]
    conf = stats.confidence[k][reach]
    gain = (exit_value - base - head)[reach]  # change for a reaching sample when it exits at k
    order = np.argsort(-conf, kind="stable")
    conf_sorted, gain_cum = conf[order], np.concatenate([[0.0], np.cumsum(gain[order])])
    n_exiting = np.searchsorted(-conf_sorted, -grid, side="right")  # count of conf >= t
    values = head * reach.sum() + gain_cum[n_exiting]
    best = int(np.argmin(values))
    return float(grid[best]) if values[best] < -1e-12 else OFF


def _descend(stats: ExitStats, thresholds: np.ndarray, penalty: float, grid: list[np.ndarray],
             max_exits: int | None, sweeps: int = 8) -> np.ndarray:
    """Coordinate descent on flops_fraction + penalty * drop, one exit's threshold at a time."""
    th = thresholds.copy()
    for _ in range(sweeps):
        before = th.copy()
        for k in range(stats.num_exits):
            value = _best_threshold(stats, th, k, penalty, grid[k])
            if np.isfinite(value) and not np.isfinite(th[k]) and max_exits is not None \
                    and np.isfinite(th).sum() >= max_exits:
                continue  # would exceed the cap on active exits
            th[k] = value
        if np.array_equal(before, th):
            break
    return th


def joint_path(stats: ExitStats, starts: list[np.ndarray], penalties=None, grid_points: int = 200,
               max_exits: int | None = None) -> list[CascadeResult]:
    """Cascades tuned jointly for a sweep of drop penalties, from most to least conservative.

    Each penalty runs coordinate descent from every start (e.g. the paper's solution and "all off")
    and keeps the best; the returned path is sorted by drop, then FLOPs, with dominated points removed.
    """
    if penalties is None:
        penalties = np.geomspace(0.5, 500.0, 40)
    grid = _grid(stats, grid_points)
    found = [evaluate_cascade(stats, s) for s in starts]
    for penalty in sorted(penalties, reverse=True):
        runs = [_descend(stats, s, penalty, grid, max_exits) for s in starts]
        results = [evaluate_cascade(stats, t) for t in runs]
        best = min(results, key=lambda r: r.flops_fraction + penalty * r.drop)
        found.append(best)
        starts = starts + [best.thresholds]  # warm start the next, more aggressive penalty
        starts = starts[-4:]
    found.sort(key=lambda r: (r.drop, r.flops_fraction))
    path, best_flops = [], np.inf
    for r in found:
        if r.flops_fraction < best_flops - 1e-12:
            path.append(r)
            best_flops = r.flops_fraction
    return path


def best_within(path: list[CascadeResult], tolerance: float) -> CascadeResult:
    """The cheapest cascade of a path whose (empirical) drop stays within tolerance."""
    ok = [r for r in path if r.drop <= tolerance + 1e-12]
    return min(ok, key=lambda r: r.flops_fraction)


def binomial_p_value(errors: int, n: int, tolerance: float) -> float:
    """p-value of H0 "true drop > tolerance" after seeing ``errors`` drop events in ``n`` samples."""
    return float(binom.cdf(errors, n, tolerance))


@dataclass
class Certification:
    """Outcome of the fixed-sequence test on the certification samples."""

    chosen: CascadeResult  # measured on the certification samples
    tested: int  # how many path points were tested
    accepted: int  # how many were accepted before the first failure
    confidence_level: float
    p_values: list[float] = field(default_factory=list)
    shape: np.ndarray | None = None  # the designed shape whose scaled family was tested (OFF: inactive)
    scale: float | None = None  # the chosen point's s in ``1 - s (1 - shape)``; None: nothing accepted
    scales: list[float] = field(default_factory=list)  # the family's points, strict to loose


def certify(path: list[CascadeResult], certify_stats: ExitStats, tolerance: float,
            delta: float = 0.1, scales=None) -> Certification:
    """Learn-then-Test: walk the path from safe to aggressive, keep going while each cascade's drop on
    the certification samples rejects "drop > tolerance" at level delta; keep the cheapest accepted.

    The path must have been built without the certification samples. With no cascade accepted the
    result has every exit off (the plain backbone), which trivially keeps the promise.
    """
    n = certify_stats.confidence.shape[1]
    off = np.full(certify_stats.num_exits, OFF)
    chosen = evaluate_cascade(certify_stats, off)
    p_values, accepted, chosen_index = [], 0, None
    for i, point in enumerate(path):
        measured = evaluate_cascade(certify_stats, point.thresholds)
        p = binomial_p_value(measured.errors, n, tolerance)
        p_values.append(p)
        if p > delta:
            break
        accepted += 1
        if measured.flops_fraction < chosen.flops_fraction:
            chosen, chosen_index = measured, i
    scale = None if scales is None or chosen_index is None else float(scales[chosen_index])
    return Certification(chosen, len(p_values), accepted, 1.0 - delta, p_values, scale=scale,
                         scales=[] if scales is None else [float(s) for s in scales])


SCALES = np.linspace(0.0, 3.0, 151)  # the certified family's points, strict (0: no exit fires) to loose


def scaled_thresholds(shape: np.ndarray, scale: float) -> np.ndarray:
    """The family member ``1 - s * (1 - shape)`` on the shape's active exits (OFF elsewhere)."""
    shape = np.asarray(shape, dtype=np.float64)
    thresholds = np.full(len(shape), OFF)
    active = np.isfinite(shape)
    thresholds[active] = 1.0 - scale * (1.0 - shape[active])
    return thresholds


def scaled_path(stats: ExitStats, shape: np.ndarray, scales=None) -> list[CascadeResult]:
    """Cascades ``1 - s * (1 - shape)`` on the shape's active exits, for s from strict (0) to loose (3)."""
    scales = SCALES if scales is None else scales
    return [evaluate_cascade(stats, scaled_thresholds(shape, s)) for s in scales]


def certified_cascade(design: ExitStats, certify_stats: ExitStats, tolerance: float, delta: float = 0.1,
                      max_exits: int | None = None,
                      design_factor: float | tuple[float, ...] = DESIGN_FACTORS) -> Certification:
    """Design a cascade shape on ``design`` with the joint optimizer, then certify its scaled family on
    ``certify_stats`` (which must not have been used for anything else)."""
    if design.num_exits == 0:
        return certify([], certify_stats, tolerance, delta)
    shape = design_shape(design, tolerance, max_exits, design_factor, delta)
    result = certify(scaled_path(design, shape), certify_stats, tolerance, delta, scales=SCALES)
    result.shape = shape
    return result


def design_shape(design: ExitStats, tolerance: float, max_exits: int | None = None,
                 design_factor: float | tuple[float, ...] = DESIGN_FACTORS, delta: float = 0.1) -> np.ndarray:
    """The cascade's shape (thresholds, OFF for unused exits) designed on ``design`` alone: what the certified
    family scales, and what survivor-aware distillation (:mod:`selfxit.fit.cascade`) routes samples by.

    For each factor the joint optimizer designs the cheapest cascade within ``factor x tolerance`` on
    ``design``. With several factors, each shape's family is put through the same fixed-sequence test on
    ``design`` itself, and the shape whose accepted point is cheapest is kept. Why: the coordinate descent
    lands in different local optima at different factors, and which one certifies best is not monotone in
    the factor (shared ResNet-56, 5%: shapes designed at 1.0, 1.25 and 2.0 certified at about 0.70 of the
    FLOPs on test, the one at 1.5 at 0.75). Only the design samples choose, so the certification samples
    stay untouched and the promise is unchanged.
    """
    off = np.full(design.num_exits, OFF)
    if design.num_exits == 0:
        return off
    factors = (float(design_factor),) if isinstance(design_factor, (int, float)) else tuple(design_factor)
    starts = [best_subset(design, tolerance * f, max_exits) for f in factors] + [off]
    path = joint_path(design, starts, max_exits=max_exits)  # one path serves every factor
    shapes = [best_within(path, tolerance * f).thresholds for f in factors]
    if len(shapes) == 1:
        return shapes[0]
    flops = [certify(scaled_path(design, shape), design, tolerance, delta, scales=SCALES).chosen.flops_fraction
             for shape in shapes]
    return shapes[int(np.argmin(flops))]
