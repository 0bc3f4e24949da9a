"""The live guard's sequential test and its moves along the certified family (no server needed)."""
import math

import numpy as np
import pytest

from selfxit.core.exits import CertifiedFamily
from selfxit.serve.live_guard import NEVER, BettingTest, GuardConfig, LiveGuard

T, ALPHA = 0.05, 0.05


def _first_rejection(test: BettingTest, xs) -> int | None:
    for i, x in enumerate(xs):
        if test.update(x):
            return i + 1
    return None


def test_false_alarms_stay_below_alpha_at_the_boundary():
    """Traffic exactly at the tolerance (the worst case the promise allows), read after every sample."""
    rng = np.random.default_rng(0)
    runs = 300
    alarms = sum(_first_rejection(BettingTest(T, ALPHA), rng.random(4000) < T) is not None for _ in range(runs))
    assert alarms / runs <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / runs)


def test_detection_delay_is_within_twice_the_fixed_sample_test():
    """At T = 5% and a drop of 7.5%, a one-sided binomial test at alpha 0.05 with power 0.8 needs ~540 samples;
    after a long clean stretch the guard must alarm within about twice that on average."""
    rng = np.random.default_rng(1)
    delays = []
    for _ in range(80):
        test = BettingTest(T, ALPHA)
        assert _first_rejection(test, rng.random(3000) < 0.035) is None  # clean: no alarm
        delays.append(_first_rejection(test, rng.random(20000) < 0.075))
    assert None not in delays and np.mean(delays) <= 2 * 540


def test_clean_traffic_costs_no_wealth():
    test = BettingTest(T, ALPHA)
    for x in np.zeros(5000):
        test.update(x)
    assert test.log_wealth == 0.0  # the estimate never leaned against the promise, so nothing was bet


FAMILY = CertifiedFamily({"layer1": 0.9, "layer2": 0.8}, 1.0, [0.0, 0.5, 1.0, 1.5], T, 0.1)


def _sample(rng, wrong_rate):
    """A shadow sample whose first exit fires at the certified scale and is wrong with ``wrong_rate``."""
    backbone = 3
    first = backbone if rng.random() >= wrong_rate else 4
    return backbone, [first, backbone], [0.95, 0.99]


def test_guard_tightens_on_drift_then_relaxes_when_it_ends():
    guard = LiveGuard(FAMILY, GuardConfig(alpha=ALPHA, base_shadow=0.02, max_shadow=0.3))
    rng = np.random.default_rng(2)
    assert guard.thresholds() == pytest.approx({"layer1": 0.9, "layer2": 0.8})
    moves = [guard.observe(*_sample(rng, 0.3)) for _ in range(2000)]
    first = next(m for m in moves if m is not None)
    # at 0.5 the thresholds are 0.95 / 0.9 and the wrong exit (score 0.95) still fires: the recent shadow
    # samples show it, so the alarm goes straight to the loosest safe scale, here 0 (no exit fires)
    assert first.kind == "tighten" and first.from_scale == 1.0 and first.to_scale == 0.0
    assert guard.alarmed and guard.shadow_fraction == 0.3
    assert guard.scale == 0.0 and guard.thresholds() == {"layer1": NEVER, "layer2": NEVER}
    # s = 0 is the backbone alone: a wrong exit whose max-softmax rounds to exactly 1.0 does not fire there
    assert guard.disagrees(0.0, 3, [4, 4], [1.0, 1.0]) == 0 and guard.disagrees(1.0, 3, [4, 4], [1.0, 1.0]) == 1
    snap = guard.snapshot()
    assert snap["alarmed"] and snap["scale"] == 0.0 and snap["certified_scale"] == 1.0 and snap["tightened"] == 1
    for _ in range(6000):  # the drift is over: the looser scales agree again
        guard.observe(*_sample(rng, 0.0))
    assert guard.scale == 1.0 and not guard.alarmed and guard.shadow_fraction == 0.02
    assert [m.kind for m in guard.moves] == ["tighten", "relax", "relax"]


def test_an_alarm_steps_to_the_loosest_scale_the_recent_samples_show_safe():
    """Exit 1 is wrong only at low confidence (0.93): scales whose layer1 threshold is above 0.93 are safe."""
    family = CertifiedFamily({"layer1": 0.9}, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0], T, 0.1)  # thresholds 1, .975 ... .9
    guard = LiveGuard(family, GuardConfig(alpha=ALPHA))
    rng = np.random.default_rng(3)
    for _ in range(3000):
        wrong = rng.random() < 0.4
        move = guard.observe(3, [4 if wrong else 3], [0.93 if wrong else 0.99])
        if move is not None:
            break
    assert move is not None and move.kind == "tighten" and move.to_scale == 0.5  # threshold 0.95 > 0.93


def test_guard_refuses_what_it_cannot_guard():
    with pytest.raises(ValueError, match="without --guard"):
        LiveGuard(CertifiedFamily({"layer1": 0.9}, None, [0.0, 1.0], T, 0.1))
    with pytest.raises(ValueError, match="--guard-alpha"):
        GuardConfig(alpha=1.5)
    with pytest.raises(ValueError, match="--guard-max-shadow"):
        GuardConfig(base_shadow=0.1, max_shadow=0.05)


def test_benchmark_redraws_its_figure_from_its_json(tmp_path):
    """`benchmarks/live_guard.py --plot-from`: the windows figure from a results file, no server run."""
    import json

    import benchmark_scripts

    rows = [{"shift": "blur", "run": "off", "windows": [0.97, 0.92, 0.91]},
            {"shift": "blur", "run": "on@0.1", "windows": [0.97, 0.92, 0.96], "alarm_item": 1200}]
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"rows": rows, "settings": {"tolerance": 0.05, "window": 500, "shift_at": 500}}))
    benchmark_scripts.load("live_guard").main(["--plot", str(tmp_path / "w.png"), "--plot-from", str(results)])
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
