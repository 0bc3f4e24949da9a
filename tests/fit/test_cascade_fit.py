"""Fitting chained exits: pass-through members, survivor weights, the ensemble fit, the config at the boundary,
and a real cascade fit (survivor rounds, save/load, shrink vs no-shrink, refits reuse the independent heads)."""
import numpy as np
import pytest
import torch
from torch import nn

import selfxit
from selfxit.core.bundle import load_bundle
from selfxit.core.cascade import PASS_THROUGH, ChainedHead, is_chained
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.core.runtime import FINAL
from selfxit.evaluate.evaluation import cost_per_exit
from selfxit.fit import cascade, select
from selfxit.fit.config import FitConfig, FitConfigError
from selfxit.fit.distill import DistillConfig
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData

torch.set_num_threads(1)
OFF = select.OFF


def test_pass_through_keeps_only_the_members_a_later_exit_reads():
    out = cascade.with_pass_through(np.array([OFF, 0.9, OFF, 0.8, OFF]))
    assert out.tolist()[:4] == [PASS_THROUGH, 0.9, PASS_THROUGH, 0.8] and not np.isfinite(out[4])
    assert not np.isfinite(cascade.with_pass_through(np.full(3, OFF))).any()


def test_survivor_weights_follow_the_designed_cascade():
    # exit 0 fires on samples 0 and 1 (>= 0.8), exit 1 on sample 2; sample 3 reaches everything
    stats = select.ExitStats(np.array([[0.9, 0.85, 0.1, 0.2], [0.5, 0.5, 0.95, 0.1], [0.5, 0.5, 0.5, 0.5]]),
                             np.ones((3, 4), bool), np.zeros(3), np.array([3.0, 2.0, 1.0]), 4.0)
    w = cascade.survivor_weights(stats, np.array([0.8, 0.9, OFF]), floor=0.25)
    assert w.tolist() == [[1, 1, 1, 1], [0.25, 0.25, 1, 1], [0.25, 0.25, 0.25, 1]]


def test_ensemble_fit_moves_weight_to_the_member_that_matches_the_teacher():
    g = torch.Generator().manual_seed(0)
    own = torch.randn(2, 400, 5, generator=g).mul(2).log_softmax(2)
    teacher = own[0].exp()  # the backbone agrees with member 0 exactly
    head = ChainedHead(build_head(DEFAULT_HEAD, (8, 4, 4), 5), 5, position=1)
    before = nn.functional.kl_div(head.ensemble(own).log_softmax(1), teacher, reduction="batchmean").item()
    cascade.fit_ensemble(head, own, teacher, None)
    after = nn.functional.kl_div(head.ensemble(own).log_softmax(1), teacher, reduction="batchmean").item()
    w = head.log_weights.exp().detach()
    assert after < 0.1 * before and w[0] > 5 * w[1]


def test_config_at_the_boundary():
    assert FitConfig(cascade=True, survivor_rounds=2).survivor_rounds == 2
    with pytest.raises(FitConfigError, match="survivor_rounds > 0 needs cascade"):
        FitConfig(survivor_rounds=1)
    with pytest.raises(FitConfigError, match="cascade=true needs gate='confidence'"):
        FitConfig(cascade=True, gate="learned")
    with pytest.raises(FitConfigError, match="cascade must be true or false"):
        FitConfig.from_dict({"cascade": "yes"})
    with pytest.raises(FitConfigError, match=r"survivor_rounds must be an int in \[0, 10\]"):
        FitConfig(cascade=True, survivor_rounds=-1)
    with pytest.raises(FitConfigError, match=r"ensemble_split must be one of \('train', 'tune'\); got 'val'"):
        FitConfig(cascade=True, ensemble_split="val")


@pytest.fixture(scope="module")
def chained(shared, slow_setup, tmp_path_factory):
    model, info = load_backbone("cifar_resnet20")
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=600, seed=2)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=4)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=125), tmp_path_factory.mktemp("medial"),
               augment_copies=1, progress=False)
    ee.fit(0.1, distill=DistillConfig(epochs=3), progress=False)
    independent = {n: r.head for n, r in ee.records.items()}
    report = ee.fit(0.1, distill=DistillConfig(epochs=3), cascade=True, survivor_rounds=1, progress=False)
    images = torch.stack([traffic[i][0] for i in range(64)])
    return ee, model, report, images, independent


def test_cascade_fit_chains_the_active_exits(chained):
    ee, _, report, images, _ = chained
    active = list(ee.thresholds)
    assert active, "the cascade should use at least one exit at a 10% tolerance"
    assert all(is_chained(ee.records[n].head) for n in active)
    positions = [ee.records[n].head.position for n in active]
    assert positions == list(range(len(active)))  # every member a later exit reads runs (pass-through or not)
    costs = cost_per_exit(ee)
    assert np.all(np.diff(costs) > 0)  # every chain member's head is counted
    out, full = ee(images), ee(images, shrink=False)
    assert torch.equal(out.exit, full.exit) and torch.equal(out.predictions, full.predictions)
    with torch.no_grad():
        reference = ee.backbone(images)
    final = out.exit == FINAL
    assert torch.equal(out.logits[final], reference[final])
    for k, name in enumerate(active):  # a pass-through member never answers
        if ee.thresholds[name] >= PASS_THROUGH:
            assert not (out.exit == k).any()
    assert report.chosen_test is not None and report.chosen_test.agreement > 0.8


def test_cascade_bundle_round_trip(chained, tmp_path):
    ee, model, _, images, _ = chained
    path = ee.save(tmp_path / "bundle")
    again = selfxit.load(path, model)
    assert [is_chained(r.head) for r in again.records.values()] == [is_chained(r.head) for r in ee.records.values()]
    a, b = ee(images), again(images)
    assert torch.equal(a.exit, b.exit) and torch.equal(a.logits, b.logits)
    manifest, _ = load_bundle(path)
    assert manifest["config"]["cascade"] and manifest["config"]["survivor_rounds"] == 1
    assert [e.get("chain", {}).get("position") for e in manifest["exits"] if e["threshold"] is not None] == \
        list(range(len(ee.thresholds)))


def test_refit_without_cascade_reuses_the_independent_heads(chained):
    ee, _, _, _, independent = chained
    chained_records = dict(ee.records)
    try:
        ee.fit(0.1, distill=DistillConfig(epochs=3), progress=False)
        assert not any(is_chained(r.head) for r in ee.records.values())
        assert all(ee.records[n].head is independent[n] for n in ee.records if n in independent)
    finally:
        ee.set_records(list(chained_records.values()))


def test_report_records_chained_heads_as_the_runtime_runs_them(chained):
    ee, _, _, images, _ = chained
    from selfxit.evaluate.report.compute import record

    layers = list(ee.heads)
    data = record(ee, [images], layers, pool_size=4, progress=False)
    full = ee(images, shrink=False)
    for k, name in enumerate(ee.thresholds):  # the calibrated confidence of each active exit, as the runtime has it
        row = layers.index(name)
        assert np.allclose(data["conf_cal"][row], full.exit_confidence[k].numpy(), atol=1e-5)


def test_ensemble_on_tune(chained):
    ee, _, _, images, _ = chained
    saved = dict(ee.records)
    try:
        ee.fit(0.1, distill=DistillConfig(epochs=3), cascade=True, ensemble_split="tune", progress=False)
        assert all(is_chained(ee.records[n].head) for n in ee.thresholds)
        out, full = ee(images), ee(images, shrink=False)
        assert torch.equal(out.exit, full.exit) and torch.equal(out.predictions, full.predictions)
    finally:
        ee.set_records(list(saved.values()))
