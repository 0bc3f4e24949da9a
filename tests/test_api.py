"""Integration: wrap the real shared CIFAR ResNet-20, collect real images, fit, run, save and load."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import selfxit
from selfxit.core.bundle import BundleError
from selfxit.core.runtime import FINAL
from selfxit.fit.distill import DistillConfig
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData


@pytest.fixture(scope="module")
def fitted(shared, slow_setup, tmp_path_factory):
    model, info = load_backbone("cifar_resnet20")
    bn_before = {k: v.clone() for k, v in model.state_dict().items()}
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=400, seed=1)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=4)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=100), tmp_path_factory.mktemp("medial"),
               augment_copies=1, progress=False)
    ee.fit(0.05, distill=DistillConfig(epochs=8), method="joint", progress=False)
    images = torch.stack([traffic[i][0] for i in range(24)])
    return ee, model, bn_before, images


def test_backbone_is_frozen_and_untouched(fitted):
    ee, model, before, _ = fitted
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics did not move


def test_fit_report_and_cascade(fitted):
    ee, *_ = fitted
    report = ee.report
    assert report.tolerance == 0.05 and report.method == "joint"
    assert {h.layer for h in report.heads} == {c.name for c in ee.candidates}
    assert all(0 <= h.agreement <= 1 and h.temperature > 0 and h.head_flops > 0 for h in report.heads)
    assert len(ee.heads) >= 2 and set(ee.thresholds) <= set(ee.heads)
    assert set(report.baselines) == {"paper", "joint", "certified"}
    val = report.baselines["joint"]["val"]
    assert val.agreement >= 1 - 0.05 - 1e-9  # the uncorrected joint optimizer holds on the split it was tuned on


def test_non_exited_samples_equal_the_backbone(fitted):
    ee, model, _, images = fitted
    low = dict(ee.thresholds)
    ee.thresholds = {name: 0.5 for name in ee.heads}  # make exits fire often
    try:
        out = ee(images)
    finally:
        ee.thresholds = low
    with torch.no_grad():
        reference = model(images)
    final = out.exit == FINAL
    assert torch.equal(out.logits[final], reference[final])
    assert torch.allclose(out.probabilities.sum(1), torch.ones(len(images)))
    assert ((out.exit >= 0) | final).all()


def test_save_load_round_trip(fitted, tmp_path):
    ee, model, _, images = fitted
    path = ee.save(tmp_path / "bundle")
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("format_version", "backbone_fingerprint", "candidates", "exits", "provenance", "tolerance", "created",
                "backbone_flops"):
        assert key in manifest
    again = selfxit.load(path, model)
    a, b = ee(images), again(images)
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.exit, b.exit)
    assert torch.allclose(a.probabilities, b.probabilities)


def test_bundle_refuses_another_backbone(fitted, tmp_path):
    ee, *_ = fitted
    path = ee.save(tmp_path / "bundle")
    other, _ = load_backbone("cifar_resnet56")
    with pytest.raises(BundleError, match="built for backbone"):
        selfxit.load(path, other)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(2, 3, 28, 28), ValueError, "input shape"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "dtype"),
    (np.zeros((2, 3, 32, 32)), TypeError, "torch.Tensor"),
    (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
])
def test_bad_input_is_named(fitted, bad, error, match):
    ee, *_ = fitted
    with pytest.raises(error, match=match):
        ee(bad)


@pytest.mark.parametrize("tolerance", [0, 1, -0.1, 1.5])
def test_tolerance_outside_unit_interval(fitted, tolerance):
    ee, *_ = fitted
    with pytest.raises(ValueError, match="tolerance"):
        ee.fit(tolerance, progress=False)


def test_callback_gets_every_sample_once(fitted):
    ee, _, _, images = fitted
    seen = []
    out = ee(images, callback=seen.append)
    assert sorted(r.index for r in seen) == list(range(len(images)))
    for r in seen:
        assert r.prediction == int(out.predictions[r.index]) and r.exit == int(out.exit[r.index])


def test_wrap_rejects_bad_models():
    with pytest.raises(TypeError, match="nn.Module"):
        selfxit.wrap(lambda x: x, torch.zeros(1, 3))

    class Features(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1)

    with pytest.raises(ValueError, match="logits"):
        selfxit.wrap(Features(), torch.zeros(1, 4))


def test_fit_accepts_given_head_architectures(fitted, tmp_path):
    """Runs last: it retrains one head of the shared fixture with a conv head spec."""
    ee, model, _, images = fitted
    layer = ee.candidates[-1].name
    spec = {"kind": "conv_linear", "convs": [{"out": 8, "kernel": 3, "stride": 2}], "pool": 1, "hidden": [16]}
    ee.fit(0.05, heads={layer: spec}, distill=DistillConfig(epochs=2), method="joint", progress=False)
    if layer in ee.heads:  # a near-chance head would be discarded
        assert ee.head_specs[layer] == spec and isinstance(ee.heads[layer][0], nn.Conv2d)
        again = selfxit.load(ee.save(tmp_path / "b"), model)
        assert again.head_specs[layer] == spec
        assert torch.equal(again(images).predictions, ee(images).predictions)
    with pytest.raises(ValueError, match="unknown layers"):
        ee.fit(0.05, heads={"no.such.layer": spec}, progress=False)
