"""Exit selection maths on small hand-built ExitStats: thresholds, cascade cost/risk, subsets, joint path, LTT."""
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from selfxit.fit import select as o
from selfxit.fit.select import OFF, ExitStats

T, F = True, False


def _stats(conf, agree, head=None, remaining=None, total=100.0) -> ExitStats:
    conf = np.asarray(conf, dtype=float)
    k = conf.shape[0]
    head = np.ones(k) if head is None else head
    remaining = np.linspace(total * 0.9, total * 0.2, k) if remaining is None else remaining
    return ExitStats(conf, agree, head, remaining, total)


def _random_stats(seed: int, k: int = 3, n: int = 300, ties: bool = False) -> ExitStats:
    """Heads whose agreement becomes more likely with confidence, deeper heads a bit better."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.1, 1.0, size=(k, n)) ** (1.0 / (1 + np.arange(k)))[:, None]
    if ties:
        conf = np.round(conf, 1)
    agree = rng.uniform(size=(k, n)) < 0.5 + 0.5 * conf
    head = rng.uniform(0.5, 3.0, size=k)
    remaining = np.sort(rng.uniform(10, 95, size=k))[::-1]
    return ExitStats(conf, agree, head, remaining, 100.0)


def _own_drop(conf, agree, t) -> float:
    return float(np.mean((conf >= t) & ~agree)) if np.isfinite(t) else 0.0


# ---- ExitStats ---------------------------------------------------------------------------------------------

def test_exit_stats_validates_shapes():
    with pytest.raises(ValueError, match="must both be"):
        ExitStats(np.zeros((2, 3)), np.zeros((2, 4), bool), np.ones(2), np.ones(2), 1.0)
    with pytest.raises(ValueError, match="one value per exit"):
        ExitStats(np.zeros((2, 3)), np.zeros((2, 3), bool), np.ones(3), np.ones(2), 1.0)


# ---- coverage_threshold ----------------------------------------------------------------------------------

def test_coverage_threshold_hand_example():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    agree = np.array([T, T, F, T])
    assert o.coverage_threshold(conf, agree, 0.0) == 0.8
    assert o.coverage_threshold(conf, agree, 0.24) == 0.8
    assert o.coverage_threshold(conf, agree, 0.25) == 0.6
    assert o.coverage_threshold(conf, agree, 1.0) == 0.6
    # Order of the input does not matter.
    perm = np.array([2, 0, 3, 1])
    assert o.coverage_threshold(conf[perm], agree[perm], 0.0) == 0.8


def test_coverage_threshold_never_splits_ties():
    # The two 0.8s must be admitted together; one of them disagrees, so budget 0 stops at 0.9.
    conf = np.array([0.9, 0.8, 0.8, 0.7])
    agree = np.array([T, T, F, T])
    assert o.coverage_threshold(conf, agree, 0.0) == 0.9
    assert o.coverage_threshold(conf, agree, 0.25) == 0.7
    # An all-tied head is either fully in or fully out.
    assert o.coverage_threshold(np.full(4, 0.5), np.array([T, T, T, F]), 0.2) == OFF
    assert o.coverage_threshold(np.full(4, 0.5), np.array([T, T, T, F]), 0.25) == 0.5


def test_coverage_threshold_infeasible_is_off():
    conf = np.array([0.9, 0.8, 0.7])
    agree = np.array([F, T, T])
    assert o.coverage_threshold(conf, agree, 0.0) == OFF
    assert o.coverage_threshold(conf, agree, 0.3) == OFF  # one miss = 1/3 > 0.3
    assert o.coverage_threshold(conf, agree, 1 / 3) == 0.7
    assert o.coverage_threshold(np.array([]), np.array([], bool), 0.5) == OFF


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), budget=st.floats(0.0, 0.5))
def test_coverage_threshold_is_the_largest_feasible_coverage(seed, n, budget):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(size=n), 1)  # plenty of ties
    agree = rng.uniform(size=n) < 0.7
    t = o.coverage_threshold(conf, agree, budget)
    feasible = [v for v in np.unique(conf) if _own_drop(conf, agree, v) <= budget + 1e-12]
    if not feasible:
        assert t == OFF
    else:
        assert t == min(feasible)


# ---- evaluate_cascade ------------------------------------------------------------------------------------

@pytest.fixture
def two_exits() -> ExitStats:
    # Exit 0 after 20 FLOPs (head 5), exit 1 after 60 FLOPs (head 10); backbone 100.
    conf = [[0.9, 0.5, 0.3, 0.95],
            [0.1, 0.8, 0.6, 0.2]]
    agree = [[T, T, F, F],
             [T, F, T, T]]
    return ExitStats(conf, agree, [5.0, 10.0], [80.0, 40.0], 100.0)


def test_evaluate_cascade_hand_example(two_exits):
    r = o.evaluate_cascade(two_exits, [0.9, 0.7])
    # s0 exits at 0 (20+5, agrees), s1 at 1 (60+5+10, disagrees), s2 nowhere (100+5+10), s3 at 0 (25, disagrees)
    assert r.flops_fraction == pytest.approx((25 + 75 + 115 + 25) / 400)
    assert r.drop == pytest.approx(0.5)
    assert r.errors == 2
    np.testing.assert_allclose(r.exit_rates, [0.5, 0.25])
    assert r.active == [0, 1]
    np.testing.assert_array_equal(o.exit_assignment(two_exits, np.array([0.9, 0.7])), [0, 1, -1, 0])


def test_evaluate_cascade_only_active_heads_are_paid(two_exits):
    r = o.evaluate_cascade(two_exits, [OFF, 0.7])
    # Only exit 1's head (10): s1 exits (60+10, disagrees), everyone else pays 100+10.
    assert r.flops_fraction == pytest.approx((110 + 70 + 110 + 110) / 400)
    assert r.drop == pytest.approx(0.25)
    np.testing.assert_allclose(r.exit_rates, [0.0, 0.25])
    assert r.active == [1]


def test_evaluate_cascade_all_off_is_the_backbone(two_exits):
    r = o.evaluate_cascade(two_exits, [OFF, OFF])
    assert r.flops_fraction == 1.0
    assert r.drop == 0.0 and r.errors == 0
    np.testing.assert_array_equal(r.exit_rates, [0.0, 0.0])
    assert r.active == []


def test_evaluate_cascade_threshold_is_inclusive(two_exits):
    # conf >= threshold fires: 0.95 and 0.9 both leave at exit 0 with threshold 0.9, only 0.95 with 0.91.
    assert o.evaluate_cascade(two_exits, [0.9, OFF]).exit_rates[0] == 0.5
    assert o.evaluate_cascade(two_exits, [0.91, OFF]).exit_rates[0] == 0.25


# ---- paper_thresholds ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), n=st.integers(1, 80),
       tolerance=st.floats(0.0, 0.3), data=st.data())
def test_paper_thresholds_budget_halves_per_exit(seed, k, n, tolerance, data):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(size=(k, n)), 2)
    agree = rng.uniform(size=(k, n)) < rng.uniform(0.3, 1.0)
    stats = _stats(conf, agree)
    subset = sorted(data.draw(st.sets(st.integers(0, k - 1), min_size=1)))
    th = o.paper_thresholds(stats, subset, tolerance)
    assert all(th[j] == OFF for j in range(k) if j not in subset)
    for n_th, j in enumerate(subset, start=1):
        # Each exit's own drop, measured on all samples, stays within T / 2**n ...
        assert _own_drop(conf[j], agree[j], th[j]) <= tolerance / 2 ** n_th + 1e-12
        # ... and it is the rule's largest coverage (not just any feasible threshold).
        assert th[j] == o.coverage_threshold(conf[j], agree[j], tolerance / 2 ** n_th)
    assert o.evaluate_cascade(stats, th).drop <= tolerance + 1e-12


# ---- subset_score / best_subset ----------------------------------------------------------------------------

def test_subset_score_matches_eq4_by_hand(two_exits):
    th = np.array([0.9, 0.7])
    # exit 0: reached 4, hits 2 (s0, s3), misses 2 -> 2*(80-5) - 2*5 = 140
    # exit 1: reached 2 (s1, s2), hits 1 (s1), misses 1 -> 1*(40-10) - 1*10 = 20
    assert o.subset_score(two_exits, th) == pytest.approx(160.0)
    # exit 1 alone: reached 4, hits 1 -> 30 - 3*10 = 0
    assert o.subset_score(two_exits, np.array([OFF, 0.7])) == pytest.approx(0.0)
    assert o.subset_score(two_exits, np.array([OFF, OFF])) == 0.0


def _brute_force_best_score(stats: ExitStats, tolerance: float, max_exits: int | None = None) -> float:
    best = 0.0  # the empty cascade
    k = stats.num_exits
    for size in range(1, (max_exits or k) + 1):
        for subset in combinations(range(k), size):
            best = max(best, o.subset_score(stats, o.paper_thresholds(stats, list(subset), tolerance)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tolerance", [0.02, 0.1])
def test_best_subset_equals_brute_force(seed, tolerance):
    stats = _random_stats(seed, k=4, n=200, ties=seed % 2 == 0)
    th = o.best_subset(stats, tolerance)
    assert o.subset_score(stats, th) == pytest.approx(_brute_force_best_score(stats, tolerance))
    # The result is the paper rule applied to its own (ordered) active set.
    active = [int(j) for j in np.flatnonzero(np.isfinite(th))]
    if active:
        np.testing.assert_array_equal(th, o.paper_thresholds(stats, active, tolerance))
    assert o.evaluate_cascade(stats, th).drop <= tolerance + 1e-12
    capped = o.best_subset(stats, tolerance, max_exits=1)
    assert np.isfinite(capped).sum() <= 1
    assert o.subset_score(stats, capped) == pytest.approx(_brute_force_best_score(stats, tolerance, 1))


def test_best_subset_nothing_helps_is_all_off():
    # Every head always disagrees: no threshold is feasible at tolerance 0.
    stats = _stats(np.random.default_rng(0).uniform(size=(3, 50)), np.zeros((3, 50), bool))
    assert np.all(o.best_subset(stats, 0.0) == OFF)


@pytest.mark.parametrize("seed", range(4))
def test_best_subset_greedy_beyond_exhaustive_limit(monkeypatch, seed):
    stats = _random_stats(seed, k=4, n=200)
    tolerance = 0.05

    def no_exhaustive(*args, **kwargs):
        raise AssertionError("exhaustive search used above EXHAUSTIVE_LIMIT")

    monkeypatch.setattr(o, "EXHAUSTIVE_LIMIT", 2)
    monkeypatch.setattr(o, "combinations", no_exhaustive)
    th = o.best_subset(stats, tolerance)
    score = o.subset_score(stats, th)
    singles = max(o.subset_score(stats, o.paper_thresholds(stats, [j], tolerance)) for j in range(4))
    assert score >= singles - 1e-9  # greedy's first step already takes the best single exit
    monkeypatch.undo()
    assert score <= _brute_force_best_score(stats, tolerance) + 1e-9
    assert o.evaluate_cascade(stats, th).drop <= tolerance + 1e-12
    active = [int(j) for j in np.flatnonzero(np.isfinite(th))]
    np.testing.assert_array_equal(th, o.paper_thresholds(stats, active, tolerance))


def _complementary_exits() -> ExitStats:
    """Three exits, each confidently right on its own third of the samples and wrong elsewhere."""
    conf = np.full((3, 300), 0.1)
    agree = np.zeros((3, 300), bool)
    for k in range(3):
        conf[k, k * 100:(k + 1) * 100] = 0.9
        agree[k, k * 100:(k + 1) * 100] = True
    return ExitStats(conf, agree, np.ones(3), np.array([90.0, 60.0, 30.0]), 100.0)


def test_best_subset_greedy_can_take_every_exit(monkeypatch):
    stats = _complementary_exits()
    monkeypatch.setattr(o, "EXHAUSTIVE_LIMIT", 2)
    th = o.best_subset(stats, 0.0)
    np.testing.assert_array_equal(th, [0.9, 0.9, 0.9])


def test_best_subset_greedy_accepts_a_cap_above_the_number_of_exits(monkeypatch):
    stats = _complementary_exits()
    exhaustive = o.best_subset(stats, 0.0, max_exits=5)  # the exhaustive branch accepts it
    monkeypatch.setattr(o, "EXHAUSTIVE_LIMIT", 2)
    np.testing.assert_array_equal(o.best_subset(stats, 0.0, max_exits=5), exhaustive)


# ---- joint_path / best_within / _best_threshold ----------------------------------------------------------------

PENALTIES = np.geomspace(1.0, 300.0, 8)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), tolerance=st.sampled_from([0.01, 0.03, 0.08]))
def test_joint_path_within_tolerance_and_never_worse_than_paper(seed, tolerance):
    stats = _random_stats(seed, k=3, n=300, ties=seed % 3 == 0)
    paper = o.best_subset(stats, tolerance)
    off = np.full(stats.num_exits, OFF)
    path = o.joint_path(stats, [paper, off], penalties=PENALTIES, grid_points=60)
    best = o.best_within(path, tolerance)
    assert best.drop <= tolerance + 1e-12
    assert best.flops_fraction <= o.evaluate_cascade(stats, paper).flops_fraction + 1e-12
    # Path: sorted by drop, strictly cheaper as drop grows, and every point re-evaluates to itself.
    drops = [r.drop for r in path]
    flops = [r.flops_fraction for r in path]
    assert drops == sorted(drops)
    assert all(b < a for a, b in zip(flops, flops[1:]))
    for r in path:
        again = o.evaluate_cascade(stats, r.thresholds)
        assert again.flops_fraction == pytest.approx(r.flops_fraction)
        assert again.errors == r.errors


def test_joint_path_respects_max_exits():
    stats = _random_stats(3, k=4, n=300)
    paper = o.best_subset(stats, 0.05, max_exits=1)
    path = o.joint_path(stats, [paper, np.full(4, OFF)], penalties=PENALTIES, grid_points=40, max_exits=1)
    assert all(len(r.active) <= 1 for r in path)
    assert len(path) >= 2  # it found something cheaper than the backbone


def test_best_within_picks_cheapest_feasible():
    def res(drop, flops):
        return o.CascadeResult(np.array([OFF]), flops, drop, np.zeros(1))

    path = [res(0.0, 1.0), res(0.01, 0.8), res(0.02, 0.6), res(0.05, 0.4)]
    assert o.best_within(path, 0.02).flops_fraction == 0.6
    assert o.best_within(path, 0.019).flops_fraction == 0.8
    assert o.best_within(path, 0.0).flops_fraction == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_best_threshold_is_exact_over_grid_and_off(seed):
    rng = np.random.default_rng(seed)
    stats = _random_stats(seed, k=3, n=120, ties=seed % 2 == 1)
    grid = o._grid(stats, 25)
    th = np.array([rng.choice(grid[j]) if rng.uniform() < 0.6 else OFF for j in range(3)])
    penalty = float(rng.choice([0.5, 3.0, 20.0, 200.0]))
    for k in range(3):
        def objective(value, k=k):
            trial = th.copy()
            trial[k] = value
            r = o.evaluate_cascade(stats, trial)
            return r.flops_fraction + penalty * r.drop

        brute = min(objective(v) for v in [*grid[k], OFF])
        chosen = o._best_threshold(stats, th, k, penalty, grid[k])
        assert chosen == OFF or chosen in grid[k]
        assert objective(chosen) == pytest.approx(brute, abs=1e-12)


# ---- certify -----------------------------------------------------------------------------------------------

def test_binomial_p_value_matches_scipy():
    for errors, n, tol in [(0, 100, 0.05), (3, 100, 0.05), (10, 200, 0.02), (50, 1000, 0.04), (7, 7, 0.5)]:
        assert o.binomial_p_value(errors, n, tol) == pytest.approx(binom.cdf(errors, n, tol), rel=1e-12)
    assert o.binomial_p_value(0, 500, 0.05) == pytest.approx(0.95 ** 500)
    # More errors never make the evidence stronger.
    ps = [o.binomial_p_value(e, 300, 0.05) for e in range(30)]
    assert ps == sorted(ps)


def test_certify_rejects_cascades_far_above_tolerance():
    rng = np.random.default_rng(0)
    design = _stats(rng.uniform(size=(2, 300)), np.zeros((2, 300), bool))
    cert_stats = _stats(rng.uniform(size=(2, 300)), np.zeros((2, 300), bool))
    path = [o.evaluate_cascade(design, th) for th in ([0.9, OFF], [0.7, 0.8], [0.0, 0.0])]
    cert = o.certify(path, cert_stats, tolerance=0.02, delta=0.1)
    assert cert.accepted == 0
    assert cert.tested == 1  # the fixed sequence stops at the first failure
    assert np.all(cert.chosen.thresholds == OFF)
    assert cert.chosen.flops_fraction == 1.0 and cert.chosen.drop == 0.0
    assert cert.confidence_level == pytest.approx(0.9)
    assert cert.p_values[0] > 0.1


def test_certify_accepts_everything_for_perfect_heads():
    rng = np.random.default_rng(1)
    design = _stats(rng.uniform(size=(3, 300)), np.ones((3, 300), bool))
    cert_stats = _stats(rng.uniform(size=(3, 500)), np.ones((3, 500), bool))
    thresholds = ([OFF, OFF, 0.9], [OFF, 0.5, 0.9], [0.8, 0.5, 0.9], [0.0, OFF, OFF])
    path = [o.evaluate_cascade(design, np.array(th)) for th in thresholds]
    cert = o.certify(path, cert_stats, tolerance=0.05, delta=0.1)
    assert cert.accepted == cert.tested == len(path)
    np.testing.assert_array_equal(cert.chosen.thresholds, [0.0, OFF, OFF])  # the cheapest: everyone leaves at 0
    assert cert.chosen.flops_fraction == pytest.approx((100 - 90 + 1) / 100)
    # The joint optimizer's path (almost everyone at exit 0) certifies as a whole too.
    joint = o.joint_path(design, [o.best_subset(design, 0.05), np.full(3, OFF)], penalties=PENALTIES, grid_points=40)
    joint_cert = o.certify(joint, cert_stats, tolerance=0.05, delta=0.1)
    assert joint_cert.accepted == joint_cert.tested == len(joint)
    assert joint_cert.chosen.flops_fraction < 0.2
    assert all(p <= 0.1 for p in cert.p_values)


def test_certify_stops_at_first_failure_even_if_later_points_pass():
    n = 400
    conf = np.full((3, n), 0.1)
    agree = np.ones((3, n), bool)
    conf[0, :200] = 0.9  # exit 0: right on the first half
    conf[1, :] = 0.9  # exit 1: fires on everyone ...
    agree[1, :] = False  # ... and always disagrees
    conf[2, :200] = 0.9  # exit 2: same as exit 0 but late
    stats = ExitStats(conf, agree, np.ones(3), np.array([80.0, 50.0, 20.0]), 100.0)
    safe, bad, cheap = [OFF, OFF, 0.5], [OFF, 0.5, 0.5], [0.5, OFF, OFF]
    path = [o.evaluate_cascade(stats, np.array(th)) for th in (safe, bad, cheap)]
    assert path[2].drop == 0.0 and path[2].flops_fraction < path[0].flops_fraction
    cert = o.certify(path, stats, tolerance=0.05, delta=0.1)
    assert (cert.tested, cert.accepted) == (2, 1)
    np.testing.assert_array_equal(cert.chosen.thresholds, safe)


# ---- Learn-then-Test guarantee (Monte Carlo) ----------------------------------------------------------------
# Population: two exits with independent confidences c ~ U(0, 1); a head disagrees with probability
# 0.3 * (1 - c). So P(c >= t and disagree) = 0.15 (1 - t)^2 and a cascade (t0, t1) has true drop
# 0.15 (1 - t0)^2 + P(c0 < t0) * 0.15 (1 - t1)^2.

MC_HEAD = np.array([1.0, 1.0])
MC_REMAINING = np.array([70.0, 30.0])


def _mc_sample(rng, n) -> ExitStats:
    conf = rng.uniform(size=(2, n))
    agree = rng.uniform(size=(2, n)) >= 0.3 * (1 - conf)
    return ExitStats(conf, agree, MC_HEAD, MC_REMAINING, 100.0)


def _true_drop(th) -> float:
    t0, t1 = (min(max(t, 0.0), 1.0) if np.isfinite(t) else 1.0 for t in th)
    return 0.15 * (1 - t0) ** 2 + t0 * 0.15 * (1 - t1) ** 2


def test_true_drop_formula_matches_a_big_population_sample():
    big = _mc_sample(np.random.default_rng(99), 400_000)
    for th in ([0.5, OFF], [OFF, 0.3], [0.6, 0.2], [0.0, 0.0], [OFF, OFF]):
        assert o.evaluate_cascade(big, np.array(th)).drop == pytest.approx(_true_drop(th), abs=2e-3)


@pytest.mark.slow
def test_certify_keeps_the_promise_with_probability_one_minus_delta():
    tolerance, delta, runs = 0.05, 0.1, 200
    rng = np.random.default_rng(2024)
    penalties = np.geomspace(1.5, 20.0, 3)  # where this population's drop-vs-FLOPs trade-off sits
    off = np.full(2, OFF)
    certified_bad = uncertified_bad = useful = 0
    for _ in range(runs):
        design, cert_stats = _mc_sample(rng, 300), _mc_sample(rng, 300)
        path = o.joint_path(design, [o.best_subset(design, tolerance), off], penalties=penalties, grid_points=40)
        cert = o.certify(path, cert_stats, tolerance, delta)
        certified_bad += _true_drop(cert.chosen.thresholds) > tolerance
        uncertified_bad += _true_drop(o.best_within(path, tolerance).thresholds) > tolerance
        useful += cert.chosen.flops_fraction < 1.0
    assert certified_bad / runs <= delta + 0.05
    # The test has teeth: trusting the design samples alone breaks the promise far more often ...
    assert uncertified_bad / runs > delta + 0.05
    # ... and the certified answer is not just "always the plain backbone".
    assert useful / runs > 0.5


def test_certified_cascade_scaled_family_is_monotone_and_safe():
    """The scaled family goes from strict to loose; certification keeps the promise on held-out data."""
    rng = np.random.default_rng(7)
    k, n = 3, 3000
    conf = rng.uniform(0, 1, size=(k, n))
    agree = rng.uniform(0, 1, size=(k, n)) < 0.7 + 0.3 * conf  # confident heads agree more
    stats = ExitStats(conf, agree, [1.0, 1.0, 1.0], [80.0, 50.0, 20.0], 100.0)
    design, cert, held = stats.subset(np.arange(0, 1000)), stats.subset(np.arange(1000, 2000)), stats.subset(np.arange(2000, 3000))
    shape = np.array([0.9, 0.8, OFF])
    path = o.scaled_path(design, shape)
    flops = [p.flops_fraction for p in path]
    answered_early = [p.exit_rates.sum() for p in path]
    assert flops == sorted(flops, reverse=True)  # more scale, lower thresholds: every sample leaves no later
    assert answered_early == sorted(answered_early)
    result = o.certified_cascade(design, cert, 0.05, delta=0.1, max_exits=2)
    assert result.confidence_level == pytest.approx(0.9)
    assert np.isfinite(result.chosen.thresholds).sum() <= 2
    assert result.chosen.drop <= 0.05 and result.chosen.flops_fraction < 1.0
    assert o.evaluate_cascade(held, result.chosen.thresholds).drop <= 0.05 + 0.02


def test_design_keeps_the_factor_whose_family_certifies_cheapest_on_the_design_samples():
    """With several design factors the kept shape is the one whose scaled family, tested on the design samples
    themselves, accepts the cheapest point; a single factor is the joint optimizer's shape at that factor."""
    from selfxit.fit.select import SCALES, certify, design_shape, scaled_path

    rng = np.random.default_rng(3)
    n, k = 1500, 4
    confidence = rng.uniform(0.2, 1.0, (k, n))
    agree = rng.uniform(size=(k, n)) < confidence ** (2 - 0.3 * np.arange(k))[:, None]
    stats = ExitStats(confidence, agree, np.full(k, 1e4), np.array([9e5, 7e5, 5e5, 3e5]), 1e6)
    factors = (1.0, 1.5, 2.0, 3.0)
    flops = {f: certify(scaled_path(stats, design_shape(stats, 0.05, 3, f)), stats, 0.05, 0.1,
                        scales=SCALES).chosen.flops_fraction for f in factors}
    chosen = design_shape(stats, 0.05, 3, factors)
    got = certify(scaled_path(stats, chosen), stats, 0.05, 0.1, scales=SCALES).chosen.flops_fraction
    assert got == pytest.approx(min(flops.values()))
    assert np.array_equal(design_shape(stats, 0.05, 3, (1.5,)), design_shape(stats, 0.05, 3, 1.5))
