"""Part B of issue 14 measured end to end (``benchmarks/drift_copy.py``: ``measure_mixed``): the certified design with
the fine-tuned copy's final exit counted. A mixed regime answers with the copy where no head fires, so its promise
covers those answers too; these tests check that the accounting does, and that without drift it is the product's
own certified design."""
import benchmark_scripts
import numpy as np
import pytest
import torch
from scipy.stats import binom

from selfxit.fit.select import ExitStats, certified_cascade, evaluate_cascade


@pytest.fixture(scope="module")
def drift_copy():
    return benchmark_scripts.load("drift_copy")


def _heads(n: int, seed: int) -> ExitStats:
    """Three heads whose confidence predicts agreement, at growing depth."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 1.0, size=(3, n))
    agree = rng.uniform(size=(3, n)) < conf ** np.array([[3.0], [1.5], [0.7]])
    return ExitStats(conf, agree, np.array([1.0, 1.0, 1.0]), np.array([80.0, 50.0, 20.0]), 100.0)


def _splits(drift_copy, final_rate: float, sizes=(1000, 2000, 3000), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 100)
    out = {}
    for k, (name, n) in enumerate(zip(("tune", "val", "test"), sizes)):
        heads = _heads(n, seed + k)
        out[name] = (heads, drift_copy._with_final(heads, rng.uniform(size=n) >= final_rate))
    return out


def test_without_drift_it_is_the_products_certified_design(drift_copy):
    splits = _splits(drift_copy, 0.0)
    for tolerance in (0.01, 0.05):
        ours = drift_copy._certified(splits, tolerance, 0.1, max_exits=4)
        product = certified_cascade(splits["tune"][0], splits["val"][0], tolerance, 0.1, max_exits=4)
        test = evaluate_cascade(splits["test"][0], product.chosen.thresholds)
        assert ours["flops_fraction"] == pytest.approx(test.flops_fraction)
        assert ours["agreement"] == pytest.approx(1 - test.drop)
        assert ours["flops_fraction"] < 1.0  # the heads do save here


def test_the_copys_final_disagreements_count_against_the_tolerance(drift_copy):
    splits = _splits(drift_copy, 0.004)
    ours = drift_copy._certified(splits, 0.05, 0.1, max_exits=4)
    assert ours["flops_fraction"] < 1.0
    heads, ext = splits["test"]
    thresholds = np.array(ours["thresholds"])
    taken = np.full(heads.confidence.shape[1], -1)
    for k in np.flatnonzero(np.isfinite(thresholds)):
        taken[(taken < 0) & (heads.confidence[k] >= thresholds[k])] = k
    early_wrong = (taken >= 0) & ~heads.agree[np.maximum(taken, 0), np.arange(len(taken))]
    late_wrong = (taken < 0) & ~ext.agree[-1]
    assert late_wrong.any()
    assert ours["agreement"] == pytest.approx(1 - (early_wrong | late_wrong).mean())
    # the test on val that accepted it counted the copy's answers too: its errors pass the binomial test at 5%
    val = evaluate_cascade(splits["val"][1], np.append(thresholds, 0.0))
    heads_only = evaluate_cascade(splits["val"][0], thresholds)
    assert val.errors > heads_only.errors
    assert binom.cdf(val.errors, splits["val"][1].confidence.shape[1], 0.05) <= 0.1


def test_a_copy_that_drifts_past_the_tolerance_falls_back_to_the_original(drift_copy):
    splits = _splits(drift_copy, 0.03)  # 3% of the copy's answers differ: beyond a 1% tolerance before any head fires
    result = drift_copy._certified(splits, 0.01, 0.1, max_exits=4)
    assert result["flops_fraction"] == 1.0 and result["agreement"] == 1.0 and result["exits"] == []
    assert result["scale"] is None


def test_mixed_regime_end_to_end_on_the_shared_resnet20(drift_copy, shared, tmp_path):
    """Small counts: the frozen row is the fit's heads, a joint setting fine-tunes a copy; the original is untouched."""
    import selfxit
    from selfxit.zoo import load_backbone
    from selfxit.zoo.data import ImageFolderData

    torch.manual_seed(0)
    model, info = load_backbone("cifar_resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=400, seed=0)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=100), out_dir=tmp_path / "medial", seed=0,
               progress=False)
    ee.fit(0.05, progress=False)
    joint = drift_copy.Joint("tiny", epochs=1)
    results = drift_copy.measure_mixed(ee, traffic, 0, (0.05,), [joint], max_train=64)
    frozen, mixed = results["settings"]["frozen regime (the fit's heads)"], results["settings"]["tiny"]
    assert frozen["final_agreement"]["test"] == 1.0
    assert 0.0 < mixed["final_agreement"]["test"] <= 1.0
    for row in (frozen, mixed):
        assert 0.0 < row["0.05"]["flops_fraction"] <= 1.0 + 1e-9
        assert set(row["head_agreement"]) == set(results["layers"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher stays frozen


def test_only_blocks_up_to_the_last_exit_train(drift_copy):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()),
                                torch.nn.Linear(3, 2))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in drift_copy._trainable(model, "1")} == {"0.weight", "0.bias", "1.0.weight", "1.0.bias"}
    assert not model[2].weight.requires_grad and model[1][0].weight.requires_grad
    assert len(drift_copy._trainable(model, None)) == 6 and model[2].weight.requires_grad
