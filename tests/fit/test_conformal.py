"""Split-conformal prediction sets: quantile maths, coverage on exchangeable data, sets at runtime."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfxit.core.runtime import FINAL
from selfxit.fit import conformal

torch.set_num_threads(1)


def test_quantile_known_values():
    scores = np.arange(100) / 100.0
    assert conformal.conformal_quantile(scores, 0.1) == pytest.approx(0.90)  # rank ceil(101 * 0.9) = 91
    assert conformal.conformal_quantile(scores[::-1], 0.5) == pytest.approx(0.50)  # rank 51, order-free
    assert conformal.conformal_quantile(scores[:5], 0.1) == 1.0  # too few samples: every class
    assert conformal.conformal_quantile(np.zeros(0), 0.1) == 1.0
    with pytest.raises(ValueError, match="alpha"):
        conformal.conformal_quantile(scores, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=300), st.sampled_from(conformal.ALPHAS))
def test_quantile_keeps_enough_calibration_scores(scores, alpha):
    q = conformal.conformal_quantile(np.array(scores), alpha)
    needed = math.ceil((len(scores) + 1) * (1 - alpha))
    if q < 1.0 or needed <= len(scores):
        assert (np.array(scores) <= q).sum() >= needed


def _exchangeable(n, seed, classes=10):
    """Softmax outputs and a 'backbone answer' drawn from them (so the sets have something to find)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 4, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = np.array([rng.choice(classes, p=p) for p in probs])
    return probs, targets


@pytest.mark.parametrize("alpha", conformal.ALPHAS)
def test_coverage_on_exchangeable_data(alpha):
    """Mean coverage over repeated calibration/test draws lies in [1 - alpha, 1 - alpha + 1/(n+1)] (+ noise)."""
    n, coverage = 400, []
    for seed in range(60):
        probs, targets = _exchangeable(n + 400, seed)
        cal = conformal.calibrate({"exit": probs[:n]}, {"exit": targets[:n]}, [alpha])
        q = cal.quantile_vector(alpha, ["exit"])
        sets = conformal.prediction_sets(torch.tensor(probs[n:]), torch.zeros(400, dtype=torch.long),
                                         torch.tensor(probs[n:].argmax(1)), q)
        coverage.append(float(sets[torch.arange(400), torch.tensor(targets[n:])].float().mean()))
    assert 1 - alpha - 0.006 <= np.mean(coverage) <= 1 - alpha + 1 / (n + 1) + 0.006


def test_sets_per_exit_and_final():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.45, 0.05], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    exit = torch.tensor([0, 1, FINAL, 1])
    predictions = probs.argmax(1)
    sets = conformal.prediction_sets(probs, exit, predictions, torch.tensor([0.35, 0.6]))
    assert sets.tolist() == [[True, False, False],   # exit 0: p >= 0.65
                             [True, True, False],    # exit 1: p >= 0.4
                             [False, False, True],   # backbone: its own answer
                             [False, False, True]]
    quality = conformal.set_quality(sets, torch.tensor([0, 1, 2, 0]), exit, 0.1)
    assert quality.coverage_early == pytest.approx(2 / 3) and quality.mean_size_early == pytest.approx(4 / 3)
    assert quality.coverage_all == pytest.approx(3 / 4) and quality.early_samples == 3
    assert quality.empty_early == 0.0


def test_calibration_round_trip_and_errors():
    probs, targets = _exchangeable(300, 0)
    cal = conformal.calibrate({"a": probs[:200], "b": probs[200:]}, {"a": targets[:200], "b": targets[200:]})
    again = conformal.ConformalCalibration.from_dict(cal.to_dict())
    assert again == cal and cal.counts == {"a": 200, "b": 100}
    assert torch.equal(again.quantile_vector(0.05, ["b", "a"]),
                       torch.tensor([cal.quantiles["0.05"]["b"], cal.quantiles["0.05"]["a"]]))
    with pytest.raises(ValueError, match="calibrated for alpha"):
        cal.quantile_vector(0.2, ["a"])
    with pytest.raises(ValueError, match="no conformal calibration for exits"):
        cal.quantile_vector(0.05, ["c"])
    with pytest.raises(ValueError, match="probability rows"):
        conformal.calibrate({"a": probs[:10]}, {"a": targets[:9]})


def test_cascade_helpers_match_direct_calibration():
    probs, targets = _exchangeable(1000, 3)
    log_probs = torch.tensor(np.stack([probs, probs[::-1].copy()])).log().float()
    taken = np.random.default_rng(0).choice([-1, 0, 1], size=1000)
    cal = conformal.calibrate_cascade(["x", "y"], [0, 1], log_probs[:, :500], taken[:500], torch.tensor(targets[:500]))
    rows = np.flatnonzero(taken[:500] == 1)
    direct = conformal.calibrate({"y": probs[::-1][rows]}, {"y": targets[rows]})
    assert cal.quantiles["0.1"]["y"] == pytest.approx(direct.quantiles["0.1"]["y"], abs=1e-6)
    quality = conformal.cascade_set_quality(cal, ["x", "y"], [0, 1], log_probs[:, 500:], taken[500:],
                                            torch.tensor(targets[500:]))
    assert set(quality) == {"0.01", "0.05", "0.1"}
    assert quality["0.01"].early_samples == int((taken[500:] >= 0).sum())
    assert quality["0.01"].coverage_early >= quality["0.1"].coverage_early
    assert quality["0.01"].mean_size_early >= quality["0.1"].mean_size_early


def test_prediction_sets_need_a_calibration():
    from selfxit.api import EarlyExitModel
    from selfxit.core.candidates import Candidate
    from selfxit.core.exits import ExitRecord
    from selfxit.core.heads import DEFAULT_HEAD, build_head
    from selfxit.zoo.cifar_resnet import cifar_resnet
    cand = Candidate("layer2", (32, 16, 16), 1)
    ee = EarlyExitModel(cifar_resnet("cifar_resnet20").eval(), (3, 32, 32), 10, [cand], backbone_flops=2)
    ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, 10), 1.0, 0.9, spec=DEFAULT_HEAD,
                               shape=cand.shape, head_flops=1)])
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no conformal calibration in this model"):
        ee(x, prediction_sets=0.05)
    assert ee(x).prediction_sets is None  # without asking, inference works as before


def test_cascade_helpers_stream_from_a_function_of_rows(monkeypatch):
    """A fit hands the conformal step a function that scores rows on demand (no [K, N, C] held): in chunks
    smaller than the split, it gives the same quantiles and set quality as the stacked tensor."""
    probs, targets = _exchangeable(1000, 5)
    log_probs = torch.tensor(np.stack([probs, probs[::-1].copy()])).log().float()
    taken = np.random.default_rng(1).choice([-1, 0, 1], size=1000)
    whole_cal = conformal.calibrate_cascade(["x", "y"], [0, 1], log_probs[:, :500], taken[:500],
                                            torch.tensor(targets[:500]))
    whole_q = conformal.cascade_set_quality(whole_cal, ["x", "y"], [0, 1], log_probs[:, 500:], taken[500:],
                                            torch.tensor(targets[500:]))
    monkeypatch.setattr(conformal, "CHUNK", 37)
    asked = []

    def rows_of(offset):
        def of(k, positions):
            asked.append(len(positions))
            return log_probs[k, torch.as_tensor(np.asarray(positions) + offset, dtype=torch.long)]
        return of

    cal = conformal.calibrate_cascade(["x", "y"], [0, 1], rows_of(0), taken[:500], torch.tensor(targets[:500]))
    quality = conformal.cascade_set_quality(cal, ["x", "y"], [0, 1], rows_of(500), taken[500:],
                                            torch.tensor(targets[500:]))
    assert cal == whole_cal
    assert max(asked) <= 37  # never more than a chunk of rows at once
    for alpha, q in whole_q.items():
        for field, value in vars(q).items():
            assert getattr(quality[alpha], field) == pytest.approx(value, abs=1e-6), (alpha, field)
