"""Batch shrinking: every sample comes back once, in order; non-exited samples equal the backbone exactly."""
import torch
from backbones import scrambled_resnet20
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.core.runtime import FINAL, EarlyExitRunner, Exit

LAYERS = {"layer1": (16, 32, 32), "layer2.2": (32, 16, 16), "layer3.1": (64, 8, 8)}


BACKBONE = scrambled_resnet20()
X = torch.randn(12, 3, 32, 32)
with torch.no_grad():
    REFERENCE = BACKBONE(X)


class ScriptedHead(nn.Module):
    """A head whose confidence for each sample is scripted by the test (by a hash of the activation)."""

    def __init__(self, in_shape, fire: set[int]):
        super().__init__()
        self.inner = build_head(DEFAULT_HEAD, in_shape, 10)
        self.fire = fire

    def forward(self, x):
        logits = self.inner(x)
        keys = [_key(row) for row in x]
        boost = torch.tensor([[50.0 if k in self.fire else 0.0] for k in keys])
        return logits + boost * nn.functional.one_hot(logits.argmax(1), 10)


ACT = {}


def _key(row):
    return ACT.get(round(float(row.double().sum()), 3), -1)


def _record_activations():
    modules = dict(BACKBONE.named_modules())
    hooks = []
    for name in LAYERS:
        def hook(m, i, out, name=name):
            for idx, row in enumerate(out):
                ACT[round(float(row.double().sum()), 3)] = idx
        hooks.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        BACKBONE(X)
    for h in hooks:
        h.remove()
    assert len(ACT) == len(LAYERS) * len(X), "activation sums must identify samples uniquely"


_record_activations()


def _runner(pattern):
    exits = [Exit(name, ScriptedHead(shape, fire), 1.0, 0.99) for (name, shape), fire in zip(LAYERS.items(), pattern)]
    return EarlyExitRunner(BACKBONE, exits, num_classes=10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=12, max_size=12), st.integers(1, 12))
def test_any_exit_pattern_returns_every_sample_once_in_order(choice, batch):
    """choice[i]: the exit sample i should leave at (3 = none)."""
    pattern = [{i for i in range(batch) if choice[i] == e} for e in range(3)]
    runner = _runner(pattern)
    seen = []
    out = runner(X[:batch], callback=lambda r: seen.append(r.index))
    assert sorted(seen) == list(range(batch))  # each sample answered exactly once
    for i in range(batch):
        expected = choice[i] if choice[i] < 3 else FINAL
        assert int(out.exit[i]) == expected
    final = out.exit == FINAL
    assert torch.equal(out.logits[final], (BACKBONE(X[:batch]) if batch < 12 else REFERENCE)[final])
    assert torch.equal(out.predictions[final], REFERENCE[:batch][final].argmax(1))


def test_lone_survivor_is_bit_exact():
    pattern = [set(range(1, 12)), set(), set()]
    out = _runner(pattern)(X)
    assert out.exit.tolist() == [FINAL] + [0] * 11
    assert torch.equal(out.logits[0], REFERENCE[0])


def test_no_shrink_mode_gives_every_exit_and_same_answers():
    pattern = [{0, 1}, {2, 3, 0}, {4}]
    runner = _runner(pattern)
    shrunk = runner(X)
    full = runner(X, shrink=False)
    assert torch.equal(shrunk.exit, full.exit)
    assert torch.equal(shrunk.predictions, full.predictions)
    assert full.exit_predictions.shape == (3, 12)
    assert torch.equal(full.logits[full.exit == FINAL], REFERENCE[full.exit == FINAL])


def test_backbone_stops_when_all_exited():
    calls = []
    runner = _runner([set(range(12)), set(), set()])
    runner(X)  # the first call of a shape also measures the batch-invariant size (full backbone passes)
    handle = dict(BACKBONE.named_modules())["linear"].register_forward_hook(lambda *a: calls.append(1))
    try:
        out = runner(X)
    finally:
        handle.remove()
    assert calls == [] and (out.exit == 0).all()


def test_the_batch_invariant_size_is_measured_once_per_backbone():
    """Runners are rebuilt after every fit, reload and guard move; the probe (full backbone passes) must not be."""
    backbone = scrambled_resnet20()
    calls = []
    handle = backbone.linear.register_forward_hook(lambda *a: calls.append(1))
    try:
        for _ in range(2):
            exits = [Exit(name, ScriptedHead(shape, set()), 1.0, 0.99) for name, shape in LAYERS.items()]
            EarlyExitRunner(backbone, exits, num_classes=10)(X[:4])
    finally:
        handle.remove()
    probe_calls = len(calls) - 2  # one backbone pass per call (nothing exits)
    assert probe_calls > 0
    calls.clear()
    handle = backbone.linear.register_forward_hook(lambda *a: calls.append(1))
    try:
        exits = [Exit(name, ScriptedHead(shape, set()), 1.0, 0.99) for name, shape in LAYERS.items()]
        EarlyExitRunner(backbone, exits, num_classes=10)(X[:4])
    finally:
        handle.remove()
    assert calls == [1]  # a third runner on the same backbone only runs the batch itself
