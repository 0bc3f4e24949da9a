"""Chained exits at run time: the chain follows the surviving rows, shrunk and unshrunk runs agree, the
backbone's answer stays bit-exact, and a chain with a missing member is refused."""
import pytest
import torch
from backbones import scrambled_resnet20
from hypothesis import given, settings
from hypothesis import strategies as st

from selfxit.core.cascade import PASS_THROUGH, ChainedHead, from_config, is_chained
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.core.runtime import FINAL, EarlyExitRunner, Exit

torch.set_num_threads(1)
LAYERS = {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3.1": (64, 8, 8)}


BACKBONE = scrambled_resnet20()


def _chain(seed):
    torch.manual_seed(seed)
    heads = []
    for position, shape in enumerate(LAYERS.values()):
        head = ChainedHead(build_head(DEFAULT_HEAD, shape, 10), 10, position)
        with torch.no_grad():
            if head.previous is not None:
                head.previous.weight.normal_(0, 0.5)  # a live cascade connection
            head.log_weights.normal_(0, 0.5)
        heads.append(head.eval())
    return heads


def _runner(thresholds, seed=0, temperature=1.5):
    exits = [Exit(name, head, temperature, th) for (name, _), head, th in zip(LAYERS.items(), _chain(seed), thresholds)]
    return EarlyExitRunner(BACKBONE, exits, num_classes=10)


def _reference(runner, x):
    """Every exit's calibrated ensemble output on the whole batch, from the full activations."""
    modules = dict(BACKBONE.named_modules())
    acts = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in LAYERS]
    with torch.no_grad():
        final = BACKBONE(x)
        for h in hooks:
            h.remove()
        chain, outputs = None, []
        for e in runner.exits:
            logits, chain = e.head(acts[e.layer], chain)
            outputs.append((logits / e.temperature).softmax(1))
    return torch.stack(outputs), final


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from([0.2, 0.4, 0.6, 0.9, PASS_THROUGH]), min_size=3, max_size=3),
       st.integers(1, 9), st.integers(0, 3))
def test_chained_shrinking_matches_the_full_chain(thresholds, batch, seed):
    runner = _runner(thresholds, seed)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    shrunk, full = runner(x), runner(x, shrink=False)
    assert torch.equal(shrunk.exit, full.exit) and torch.equal(shrunk.predictions, full.predictions)
    probs, final = _reference(runner, x)
    fired = probs.amax(2) >= torch.tensor(thresholds)[:, None]
    expected = torch.where(fired.any(0), fired.float().argmax(0), torch.tensor(FINAL))
    assert shrunk.exit.tolist() == expected.tolist()
    assert not (shrunk.exit == thresholds.index(PASS_THROUGH)).any() if PASS_THROUGH in thresholds else True
    early = shrunk.exit != FINAL
    rows = torch.nonzero(early).flatten()
    assert torch.allclose(shrunk.probabilities[rows], probs[shrunk.exit[rows], rows], atol=1e-5)
    assert torch.equal(shrunk.logits[~early], final[~early])  # the backbone's own bits


def test_missing_chain_member_is_refused():
    chain = _chain(0)
    exits = [Exit("layer1", chain[0], 1.0, 0.5), Exit("layer3.1", chain[2], 1.0, 0.5)]  # layer2's member left out
    with pytest.raises(RuntimeError, match="PASS_THROUGH"):
        EarlyExitRunner(BACKBONE, exits, 10)(torch.randn(4, 3, 32, 32))


def test_config_rebuilds_the_same_module():
    head = _chain(1)[1]
    again = from_config(build_head(DEFAULT_HEAD, LAYERS["layer2"], 10), 10, head.config())
    again.load_state_dict(head.state_dict())
    x, chain = torch.randn(3, *LAYERS["layer2"]), torch.randn(1, 3, 10).log_softmax(2)
    assert is_chained(again) and torch.equal(head(x, chain)[0], again(x, chain)[0])
    assert set(head.state_dict()) == {k for k in again.state_dict()}  # no duplicated views in the state dict
    assert not any(k.startswith("_") for k in head.state_dict())
    with pytest.raises(ValueError, match="position"):
        from_config(build_head(DEFAULT_HEAD, LAYERS["layer2"], 10), 10, {"reads_previous": True})
