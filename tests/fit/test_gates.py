"""Learned exit gates: targets, features, FLOPs, training, chain fitting, runtime and a real fit/save/load."""
import math

import numpy as np
import pytest
import torch
from backbones import scrambled_resnet20
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import selfxit
from selfxit.cli import build_parser
from selfxit.core.flops import count_flops
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.core.runtime import FINAL, EarlyExitRunner, Exit
from selfxit.evaluate.evaluation import cost_per_exit
from selfxit.fit import gates
from selfxit.fit import select as optimize
from selfxit.fit.distill import DistillConfig
from selfxit.zoo import load_backbone
from selfxit.zoo.data import ImageFolderData

torch.set_num_threads(1)


def _log_probs(rows):
    """[K, N, C] log-probabilities from per-exit lists of per-sample probability vectors."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ---- targets ---------------------------------------------------------------------------------------------

def test_targets_cheapest_agreeing_exit():
    # 2 exits, 3 classes; backbone answers class 0 for every sample.
    confident, unsure, wrong = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.1, 0.8, 0.1]
    lp = _log_probs([[confident, wrong, unsure, wrong],     # exit 0
                     [confident, confident, wrong, wrong]])  # exit 1
    top1 = torch.zeros(4, dtype=torch.long)
    costs = np.array([0.3, 0.7, 1.0])
    labels = gates.gate_targets(lp, top1, costs, math.inf)
    # agree at both; only at 1; only at 0; at neither
    assert labels.tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    # lam small: exit 0's unsure agreement (CE 0.92) is not worth the 0.3 saved at lam = 1, but is at lam = 10
    assert gates.gate_targets(lp, top1, costs, 1.0)[:, 2].tolist() == [0, 0]
    assert gates.gate_targets(lp, top1, costs, 10.0)[:, 2].tolist() == [1, 0]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.sampled_from([0.5, 2.0, 8.0, math.inf]), st.integers(0, 10_000))
def test_targets_properties(k, n, lam, seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(k, n, 3, generator=g).mul(3).log_softmax(2)
    top1 = torch.randint(0, 3, (n,), generator=g)
    costs = np.append(np.sort(np.random.default_rng(seed).uniform(0.05, 0.95, k)), 1.0)
    labels = gates.gate_targets(lp, top1, costs, lam).bool()
    agree = lp.argmax(2) == top1[None]
    assert not (labels & ~agree).any()  # a gate never learns to fire where its exit disagrees
    first = torch.where(labels.any(0), labels.float().argmax(0), k)
    position = torch.arange(k)[:, None]
    assert torch.equal(labels, (position >= first[None]) & agree)  # from the target on, wherever it agrees
    if math.isinf(lam):  # the target is the cheapest agreeing exit
        assert torch.equal(labels, agree & (position >= torch.where(agree.any(0), agree.float().argmax(0), k)[None]))


def test_exit_costs_and_distribution():
    costs = gates.exit_costs([10, 20], [60, 30], 100.0)
    assert np.allclose(costs, [0.5, 1.0, 1.3])  # reached FLOPs plus every head so far
    dist = gates.exit_distribution(np.array([[0.5, 1.0], [0.5, 0.2]]))
    assert np.allclose(dist, [[0.5, 1.0], [0.25, 0.0], [0.25, 0.0]])
    assert np.allclose(dist.sum(0), 1.0)


# ---- the gate module -------------------------------------------------------------------------------------

def test_features_known_values():
    gate = gates.Gate(4, previous=True)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0]])
    previous = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])
    f = dict(zip(gate.feature_names, gate.features(logits, previous).T))
    assert torch.allclose(f["max_prob"], torch.tensor([0.25, 1.0]))
    assert torch.allclose(f["entropy"], torch.tensor([math.log(4), 0.0]), atol=1e-5)
    assert torch.allclose(f["entropy_t2"][0], torch.tensor(math.log(4))) and 0 < f["entropy_t2"][1] < 0.01
    assert torch.allclose(f["margin"], torch.tensor([0.0, 1.0]))
    assert torch.allclose(f["previous_gap"], torch.tensor([0.6, 0.0]))  # uniform logits: top-1 is class 0
    assert torch.allclose(f["previous_prob"], torch.tensor([0.1, 0.6]))
    assert torch.isfinite(f["log_odds"]).all()
    with pytest.raises(ValueError, match="previous exit"):
        gate(logits)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        gate(torch.zeros(2, 5), previous)


@pytest.mark.parametrize("hidden, previous", [(0, False), (0, True), (8, True)])
def test_gate_flops_under_two_percent_of_the_head(hidden, previous):
    gate = gates.Gate(10, hidden=hidden, previous=previous)
    # the cheapest head this project builds on CIFAR ResNets: pool 4x4 + MLP on a 16-channel activation
    head_flops = count_flops(build_head(DEFAULT_HEAD, (16, 32, 32), 10), torch.zeros(1, 16, 32, 32))
    assert gate.flops() < 0.02 * head_flops

    class WithPrevious(nn.Module):
        def forward(self, x):
            return gate(x, x.softmax(1) if previous else None)

    # the analytic count covers at least what DeepSpeed's profiler sees of the gate
    assert count_flops(WithPrevious(), torch.randn(1, 10)) <= gate.flops()


def test_train_gate_separates_and_spec_round_trips():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 10, generator=g) * 3
    targets = (logits.softmax(1).max(1).values > 0.6).float()  # learnable from max-prob alone
    gate = gates.train_gate(gates.Gate(10), logits, None, targets, gates.GateConfig())
    scores = gate(logits)
    assert ((scores > 0.5).float() == targets).float().mean() > 0.95
    again = gates.build_gate(gate.spec())
    again.load_state_dict(gate.state_dict())
    assert torch.equal(again(logits), scores)
    constant = gates.train_gate(gates.Gate(10), logits, None, torch.ones(400), gates.GateConfig())
    assert (constant(logits) > 0.99).all()
    with pytest.raises(ValueError, match="num_classes"):
        gates.build_gate({"hidden": 2})


@pytest.mark.parametrize("kwargs, match", [({"lam": 0}, "lam"), ({"hidden": -1}, "hidden"),
                                           ({"second_temperature": 0}, "second_temperature"),
                                           ({"head_rounds": -1}, "head_rounds")])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gates.GateConfig(**kwargs)


def _synthetic(n, seed, k=4, classes=5):
    """Exits getting better along the chain; the backbone's answer is class 0."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.linspace(2.0, 6.0, k)[:, None]
    logits = torch.randn(k, n, classes, generator=g)
    logits[:, :, 0] += signal * torch.rand(1, n, generator=g)  # per-sample easiness, shared by the exits
    return logits.log_softmax(2), torch.zeros(n, dtype=torch.long)


def test_fit_gates_chain_is_what_certification_keeps():
    lp, top1 = _synthetic(1500, 0)
    flops = dict(head_flops=[1e4] * 4, remaining_flops=[8e5, 6e5, 4e5, 2e5], total_flops=1e6)
    fit = gates.fit_gates(lp, top1, tolerance=0.05, max_exits=2, config=gates.GateConfig(lam=4.0, previous=True),
                          **flops)
    assert 1 <= len(fit.chain) <= 2 and fit.chain == sorted(fit.chain) and fit.history[0] == [0, 1, 2, 3]
    assert all(g.previous == (j > 0) for j, g in enumerate(fit.gates))
    tune = fit.stats(lp, top1, **flops)
    assert ((tune.confidence >= 0) & (tune.confidence <= 1)).all()
    assert np.allclose(tune.head_flops, 1e4 + np.array([g.flops() for g in fit.gates]))
    lp_val, top_val = _synthetic(1500, 1)
    cert = optimize.certified_cascade(tune, fit.stats(lp_val, top_val, **flops), 0.05, 0.1, 2)
    assert cert.chosen.active in ([], list(range(len(fit.chain))))  # every gate's previous exit is active


# ---- runtime ---------------------------------------------------------------------------------------------


BACKBONE = scrambled_resnet20()
LAYERS = {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3.1": (64, 8, 8)}


def _gated_runner(threshold, seed=0):
    torch.manual_seed(seed)
    exits = []
    for j, (name, shape) in enumerate(LAYERS.items()):
        gate = gates.Gate(10, hidden=4, previous=j > 0)
        with torch.no_grad():
            gate.net[0].weight.normal_(0, 2)
        exits.append(Exit(name, build_head(DEFAULT_HEAD, shape, 10).eval(), 1.0, threshold, gate.eval()))
    return EarlyExitRunner(BACKBONE, exits, num_classes=10)


@settings(max_examples=15, deadline=None)
@given(st.floats(0.05, 0.95), st.integers(1, 10), st.integers(0, 3))
def test_gated_shrinking_matches_no_shrink_and_stays_exact(threshold, batch, seed):
    """The previous exit's output follows the surviving rows: shrunk and unshrunk runs decide alike."""
    runner = _gated_runner(threshold, seed)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    shrunk, full = runner(x), runner(x, shrink=False)
    assert torch.equal(shrunk.exit, full.exit)
    assert torch.equal(shrunk.predictions, full.predictions)
    final = shrunk.exit == FINAL
    with torch.no_grad():
        reference = BACKBONE(x)
    assert torch.equal(shrunk.logits[final], reference[final])


def test_gate_scores_drive_the_exit():
    runner = _gated_runner(0.5)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    full = runner(x, shrink=False)
    modules = dict(BACKBONE.named_modules())
    acts = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in LAYERS]
    with torch.no_grad():
        BACKBONE(x)
        for h in hooks:
            h.remove()
        lp = torch.stack([e.head(acts[e.layer]).log_softmax(1) for e in runner.exits])
        scores = gates.chain_scores([e.gate for e in runner.exits], lp)
    expected = np.where((scores >= 0.5).any(0), (scores >= 0.5).argmax(0), FINAL)
    assert full.exit.tolist() == expected.tolist()


# ---- the real shared model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(shared, slow_setup, tmp_path_factory):
    model, info = load_backbone("cifar_resnet20")
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=500, seed=2)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=4)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=125), tmp_path_factory.mktemp("medial"),
               augment_copies=1, progress=False)
    report = ee.fit(0.1, distill=DistillConfig(epochs=6), gate="learned", max_exits=None, progress=False)
    images = torch.stack([traffic[i][0] for i in range(32)])
    return ee, model, report, images


def test_learned_fit_report(fitted):
    ee, _, report, _ = fitted
    assert report.gate == "learned" and report.confidence_level == pytest.approx(0.9)
    assert set(report.baselines) == {"certified", "confidence"}
    assert set(ee.gates) <= set(ee.heads) and set(ee.thresholds) <= set(ee.gates)
    assert report.gate_config == gates.config_dict(gates.GateConfig()) and report.gate_config["lam"] == "inf"
    assert set(report.prediction_sets) == {"0.01", "0.05", "0.1"}
    for exit_layer, gate in ee.gates.items():
        assert gate.flops() < 0.02 * ee.head_flops[exit_layer]


def test_learned_runtime_save_load(fitted, tmp_path):
    ee, model, _, images = fitted
    out = ee(images, prediction_sets=0.05)  # the certified cascade, with conformal sets
    final = out.exit == FINAL
    assert out.prediction_sets.shape == (len(images), 10)
    assert torch.equal(out.prediction_sets[final], nn.functional.one_hot(out.predictions[final], 10).bool())
    with pytest.raises(ValueError, match="calibrated for alpha"):
        ee(images, prediction_sets=0.2)
    again = selfxit.load(ee.save(tmp_path / "bundle"), model)
    assert again.gate == "learned" and set(again.gates) == set(ee.gates)
    out2 = again(images, prediction_sets=0.05)
    assert torch.equal(out.exit, out2.exit) and torch.equal(out.prediction_sets, out2.prediction_sets)
    chosen = dict(ee.thresholds)
    ee.thresholds = again.thresholds = {name: 0.3 for name in ee.gates}  # the whole chain, firing often
    try:
        out = ee(images)
        assert (out.exit != FINAL).any()
        assert torch.equal(out.exit, ee(images, shrink=False).exit) and torch.equal(out.exit, again(images).exit)
        with torch.no_grad():
            reference = model(images)
        final = out.exit == FINAL
        assert torch.equal(out.logits[final], reference[final])
    finally:
        ee.thresholds = chosen


def test_cost_per_exit_counts_the_gates(fitted):
    ee, *_ = fitted
    chosen, layers = dict(ee.thresholds), list(ee.gates)
    ee.thresholds = {name: 0.5 for name in layers}  # the whole gated chain
    try:
        with_gates = cost_per_exit(ee)
        ee.gate = "confidence"
        plain = cost_per_exit(ee)
    finally:
        ee.gate, ee.thresholds = "learned", chosen
    gate_flops = np.cumsum([ee.gates[n].flops() for n in layers])
    assert np.allclose(with_gates - plain, [*gate_flops, gate_flops[-1]]) and gate_flops[-1] > 0


def test_learned_gate_needs_certified_method(fitted):
    ee, *_ = fitted
    with pytest.raises(ValueError, match="method='certified'"):
        ee.fit(0.1, gate="learned", method="joint", progress=False)
    with pytest.raises(ValueError, match="gate must be one of"):
        ee.fit(0.1, gate="oracle", progress=False)


def test_cli_enable_takes_gate():
    base = ["enable", "--model", "cifar_resnet20", "--data", "d", "--out", "o"]
    assert build_parser().parse_args(base + ["--gate", "learned"]).gate == "learned"
    assert build_parser().parse_args(base).gate is None  # not given: the --config file's gate, else FitConfig's
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--gate", "oracle"])


def test_specialise_head_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(512, 8, generator=g)
    teacher = torch.randn(512, 4, generator=g).mul(2).softmax(1)
    weights = torch.zeros(512)
    weights[:64] = 1.0  # only the first 64 samples count

    def kl(head, rows):
        with torch.no_grad():
            log_student = head(features[rows]).log_softmax(1)
        return float((teacher[rows] * (teacher[rows].log() - log_student)).sum(1).mean())

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    before = kl(head, slice(0, 64)), kl(head, slice(64, None))
    gates.specialise_head(head, features, teacher, weights, epochs=40, lr=1e-2)
    after = kl(head, slice(0, 64)), kl(head, slice(64, None))
    assert after[0] < 0.5 * before[0]
    assert after[0] < after[1]


def test_bilevel_rounds_retrain_the_chain_heads(fitted):
    """Runs last: it fine-tunes the fixture's heads."""
    ee, *_ = fitted
    before = {n: [p.clone() for p in h.parameters()] for n, h in ee.heads.items()}
    config = gates.GateConfig(head_rounds=1, head_epochs=1)
    report = ee.fit(0.1, gate="learned", gate_config=config, max_exits=None, progress=False)
    assert report.gate_config["head_rounds"] == 1
    heads = ee.heads  # a head dropped as near chance by the first fit may be kept (freshly trained) now
    changed = [n for n in before if n in heads
               and any(not torch.equal(a, b) for a, b in zip(before[n], heads[n].parameters()))]
    assert changed and set(ee.thresholds) <= set(ee.gates)
