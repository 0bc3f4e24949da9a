"""Label-free temperature scaling and ECE against agreement with the backbone, on synthetic logits."""
import pytest
import torch

from selfxit.fit.calibrate import expected_calibration_error, fit_temperature


def _sample_top1(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Backbone top-1 drawn from softmax(logits / temperature)."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(1), 1, generator=g).squeeze(1)


def _logits(n: int, classes: int, scale: float, seed: int) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed)) * scale


def test_fit_temperature_recovers_known_temperature():
    true_t = 2.5
    logits = _logits(4000, 10, 4.0 * true_t, seed=0)
    top1 = _sample_top1(logits, true_t, seed=1)
    fitted = fit_temperature(logits, top1)
    assert fitted == pytest.approx(true_t, rel=0.10)


def test_fit_temperature_of_calibrated_logits_is_about_one():
    logits = _logits(4000, 5, 2.0, seed=2)
    assert fit_temperature(logits, _sample_top1(logits, 1.0, seed=3)) == pytest.approx(1.0, rel=0.10)


def test_fit_temperature_does_not_touch_inputs_or_need_grad():
    logits = _logits(500, 4, 3.0, seed=4).requires_grad_(True)
    before = logits.detach().clone()
    top1 = _sample_top1(logits.detach(), 2.0, seed=5)
    t = fit_temperature(logits, top1)
    assert isinstance(t, float) and t > 0
    assert torch.equal(logits.detach(), before)
    assert logits.grad is None


def test_fit_temperature_empty_input():
    assert fit_temperature(torch.empty(0, 10), torch.empty(0, dtype=torch.long)) == 1.0


def _calibrated_probs(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-softmax c on a random class, the rest spread evenly; the backbone agrees with probability c."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.2 + 0.8 * torch.rand(n, generator=g)
    top = torch.randint(0, classes, (n,), generator=g)
    probs = ((1 - conf) / (classes - 1))[:, None].repeat(1, classes)
    probs[torch.arange(n), top] = conf
    agrees = torch.rand(n, generator=g) < conf
    other = (top + torch.randint(1, classes, (n,), generator=g)) % classes
    return probs, torch.where(agrees, top, other)


def test_ece_near_zero_when_calibrated():
    probs, top1 = _calibrated_probs(40_000, 10, seed=6)
    assert expected_calibration_error(probs, top1) < 0.02


def test_ece_large_when_overconfident():
    probs, top1 = _calibrated_probs(20_000, 10, seed=7)
    # Same agreement, but every head claims 99%: the gap is the mean disagreement (~0.4 here).
    sharp = torch.full_like(probs, 0.01 / 9)
    sharp[torch.arange(len(probs)), probs.argmax(1)] = 0.99
    agreement = float((probs.argmax(1) == top1).float().mean())
    assert expected_calibration_error(sharp, top1) == pytest.approx(0.99 - agreement, abs=0.01)
    assert expected_calibration_error(sharp, top1) > 0.3


def test_ece_exact_on_a_tiny_example():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    top1 = torch.tensor([0, 1, 1, 1])
    # bin (0.8667, 0.9333]: conf 0.9, agree 1/2 -> 0.5 * 0.4; bin (0.6667, 0.7333]: 0.7 vs 1 -> 0.25 * 0.3;
    # bin (0.5333, 0.6]: 0.6 vs 1 -> 0.25 * 0.4
    assert expected_calibration_error(probs, top1) == pytest.approx(0.5 * 0.4 + 0.25 * 0.3 + 0.25 * 0.4)


def test_temperature_scaling_reduces_ece_on_overconfident_logits():
    logits = _logits(6000, 10, 2.0, seed=8)
    top1 = _sample_top1(logits, 1.0, seed=9)
    overconfident = logits * 3.0  # the head is 3x too sharp
    before = expected_calibration_error(overconfident.softmax(1), top1)
    t = fit_temperature(overconfident, top1)
    after = expected_calibration_error((overconfident / t).softmax(1), top1)
    assert t == pytest.approx(3.0, rel=0.1)
    assert before > 0.1
    assert after < 0.03
    assert after < before / 4


def test_ece_empty_input():
    assert expected_calibration_error(torch.empty(0, 10), torch.empty(0, dtype=torch.long)) == 0.0


def test_ece_summed_chunk_by_chunk_equals_the_whole():
    from selfxit.fit.calibrate import CalibrationBins
    logits = torch.randn(1000, 10, generator=torch.Generator().manual_seed(7)) * 3
    probs, top1 = logits.softmax(1), _sample_top1(logits, 1.3, seed=8)
    bins = CalibrationBins()
    for start in range(0, 1000, 128):
        bins.add(probs[start:start + 128], top1[start:start + 128])
    assert bins.rows == 1000
    assert bins.error() == pytest.approx(expected_calibration_error(probs, top1), abs=1e-6)
    # and against the definition: share of rows per bin times |mean confidence - agreement|
    confidence, prediction = probs.max(1)
    edges, direct = torch.linspace(0, 1, 16), 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            agree = (prediction[inside] == top1[inside]).float().mean()
            direct += float(inside.float().mean() * (confidence[inside].mean() - agree).abs())
    assert bins.error() == pytest.approx(direct, abs=1e-6)


def test_temperature_fitted_in_chunks_is_the_one_fitted_at_once():
    logits = torch.randn(3000, 10, generator=torch.Generator().manual_seed(3)) * 4
    top1 = _sample_top1(logits, 2.0, seed=4)
    chunked, whole = fit_temperature(logits, top1, chunk=97), fit_temperature(logits, top1, chunk=10_000)
    # float64 loss: the optimum no longer moves with the summation order (in float32 it moved by ~1e-3)
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert fit_temperature(logits.double(), top1, chunk=10_000) == pytest.approx(whole, rel=1e-6)

    def nll(t):
        return float(torch.nn.functional.cross_entropy(logits / t, top1))

    assert nll(chunked) == pytest.approx(nll(whole), abs=1e-6)
