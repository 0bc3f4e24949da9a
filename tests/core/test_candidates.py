"""Candidate exit layers: graph articulation points, filters, fallback, user overrides, torchvision models."""
import json

import pytest
import torch
import torchvision
from torch import nn

from selfxit.core.candidates import Candidate, candidate_table, find_candidates
from selfxit.core.flops import count_flops
from selfxit.core.graph import articulation_modules
from selfxit.zoo.cifar_resnet import cifar_resnet


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Toy(nn.Module):
    """stem -> residual block -> dropout -> identity -> conv -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Residual(4)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.ident(self.drop(self.block(self.stem(x))))
        return self.fc(self.pool(self.conv(x)).flatten(1))


class Branchy(Toy):
    """Toy with data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x):
        x = self.stem(x)
        if torch.isfinite(x.sum()):  # always true, but a traced value cannot be a Python bool
            x = self.block(x)
        x = self.ident(self.drop(x))
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _names(candidates):
    return [c.name for c in candidates]


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), m.training) for m in model.modules()]


def _exits_shrink_batch(model, x, candidates):
    """Replacing each candidate's output by its first sample must give the model's output on sample 0."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        expected = model(x[:1])
        for c in candidates:
            handle = modules[c.name].register_forward_hook(lambda _m, _i, out: out[:1])
            try:
                out = model(x)
            finally:
                handle.remove()
            assert out.shape[0] == 1, c.name
            # Batch size changes the kernels' summation order; random-init logits can be large.
            assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), c.name


def test_skip_connection_hides_inner_layers():
    model = Toy()
    assert articulation_modules(model) == [
        ("stem", 1), ("block", 1), ("drop", 1), ("ident", 1), ("conv", 1), ("pool", 1), ("fc", 1)
    ]
    candidates = find_candidates(model, torch.randn(2, 3, 8, 8))
    assert _names(candidates) == ["stem", "block"]  # no-ops dropped; after conv only pool and fc are left
    assert candidates[1].shape == (4, 8, 8)
    _exits_shrink_batch(model.eval(), torch.randn(2, 3, 8, 8), candidates)
    reasons = {entry.name: entry.reason for entry in candidate_table(model, torch.randn(2, 3, 8, 8))}
    assert reasons["stem"] is None and reasons["block"] is None
    assert reasons["drop"] == "no-op at inference (Dropout)" and reasons["ident"] == "no-op at inference (Identity)"
    assert reasons["conv"].startswith("only 0.2% of the FLOPs remain after it")
    assert reasons["fc"].startswith("only 0.0% of the FLOPs remain after it")


def test_cifar_resnet56_candidates():
    model = cifar_resnet("cifar_resnet56")
    model.train()
    before = _hooks(model)
    x = torch.randn(2, 3, 32, 32)
    candidates = find_candidates(model, x)
    assert _hooks(model) == before
    # The stem (0.4% of the FLOPs) and the last two blocks (under 5% left after them) are out; ten blocks
    # spread over the FLOPs between.
    assert _names(candidates) == [
        "layer1.1", "layer1.3", "layer1.6", "layer2.0", "layer2.2",
        "layer2.5", "layer2.7", "layer3.1", "layer3.3", "layer3.6",
    ]
    shapes = {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}
    assert all(c.shape == shapes[c.name.split(".")[0]] for c in candidates)
    remaining = [c.remaining_flops for c in candidates]
    assert all(a > b > 0 for a, b in zip(remaining, remaining[1:]))
    total = count_flops(model, x)
    stem = 2 * 27 * 16 * 32 * 32 + 2 * 16 * 32 * 32 + 16 * 32 * 32  # conv1, bn1 and F.relu as DeepSpeed counts them
    block = (total - remaining[0] - stem) // 2  # layer1.0 and layer1.1 cost the same
    assert remaining[0] == total - stem - 2 * block
    fractions = [c.cumulative_flops_fraction for c in candidates]
    assert fractions == pytest.approx([1 - r / total for r in remaining])
    assert 0.05 <= fractions[0] and fractions[-1] <= 0.95
    gaps = [b - a for a, b in zip(fractions, fractions[1:])]
    assert max(gaps) < 2 * min(gaps)  # evenly spread, up to the blocks' granularity
    assert json.loads(json.dumps(candidates[0].to_dict())) == {
        "name": "layer1.1", "shape": [16, 32, 32], "remaining_flops": remaining[0],
        "cumulative_flops_fraction": fractions[0],
    }
    _exits_shrink_batch(model.eval(), x, candidates)


def test_cap_takes_the_coarsest_level_then_spreads_over_flops():
    model, x = cifar_resnet("cifar_resnet20"), torch.randn(1, 3, 32, 32)
    # eligible: layer1.0 .. layer3.1 (8 blocks, 13% to 88% of the FLOPs); two fit among the stage outputs
    assert _names(find_candidates(model, x, max_candidates=2)) == ["layer1", "layer2"]
    # three do not: all blocks, the first, the one nearest the middle and the last
    assert _names(find_candidates(model, x, max_candidates=3)) == ["layer1.0", "layer2.0", "layer3.1"]
    table = candidate_table(model, x, max_candidates=3)
    assert [e.name for e in table if e.reason and "max_candidates" in e.reason] == [
        "layer1.1", "layer1", "layer2.1", "layer2", "layer3.0"]
    with pytest.raises(ValueError):
        find_candidates(Toy(), torch.randn(1, 3, 8, 8), max_candidates=0)


def test_user_names_override():
    model = cifar_resnet("cifar_resnet20")
    candidates = find_candidates(model, torch.randn(1, 3, 32, 32), names=["layer3", "layer1.1.conv2"])
    assert _names(candidates) == ["layer1.1.conv2", "layer3"]  # forward order
    assert isinstance(candidates[1], Candidate) and candidates[1].shape == (64, 8, 8)
    assert candidates[1].remaining_flops > 0


@pytest.mark.parametrize(
    ("name", "message"),
    [("layer4", "'layer4'.*layer1"), ("layer1.0.relu", "'layer1.0.relu' is called never")],
)
def test_bad_user_names(name, message):
    model = cifar_resnet("cifar_resnet20")
    model.layer1[0].relu = nn.ReLU()  # registered but never called: BasicBlock uses F.relu
    with pytest.raises(ValueError, match=message):
        find_candidates(model, torch.randn(1, 3, 32, 32), names=[name])


def test_module_called_twice_is_rejected():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(ValueError, match="called 2 times"):
        find_candidates(Twice(), torch.randn(1, 4), names=["lin"])
    assert articulation_modules(Twice()) == []


def test_untraceable_model_falls_back_to_children():
    model = Branchy()
    with pytest.raises(torch.fx.proxy.TraceError):
        articulation_modules(model)
    with pytest.warns(UserWarning, match="could not trace Branchy"):
        candidates = find_candidates(model, torch.randn(2, 3, 8, 8))
    assert _names(candidates) == ["stem", "block"]  # conv leaves under 5% of the FLOPs
    assert _hooks(model) == _hooks(Branchy())


def test_in_place_activation_is_kept_but_no_ops_are_not():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Dropout(), nn.Identity(),
        nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2),
    )
    assert _names(find_candidates(model, torch.randn(1, 3, 6, 6))) == ["0", "1"]


TORCHVISION = [
    ("resnet18", 32), ("resnet50", 32), ("mobilenet_v3_large", 32),
    ("efficientnet_b0", 32), ("convnext_tiny", 32), pytest.param("vit_b_16", 224, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "size"), TORCHVISION)
def test_torchvision_families(arch, size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(2, 3, size, size)
    # vit_b_16 costs ~2 s per batch-2 forward on 2 CPU cores; a few exits are enough to prove the point.
    candidates = find_candidates(model, x, max_candidates=3 if arch == "vit_b_16" else 10)
    assert len(candidates) >= 2
    modules = dict(model.named_modules())
    for c in candidates:
        assert not isinstance(modules[c.name], (nn.Dropout, nn.Identity, nn.Flatten))
        assert c.remaining_flops > 0
    assert [c.remaining_flops for c in candidates] == sorted((c.remaining_flops for c in candidates), reverse=True)
    assert all(0.05 <= c.cumulative_flops_fraction <= 0.95 for c in candidates)
    _exits_shrink_batch(model, x, candidates)


# (model, input side, fewest candidates expected); every listed family at its real input size.
REAL_SIZE = [
    ("resnet18", 224, 8), ("resnet50", 224, 10), ("mobilenet_v3_large", 224, 10), ("efficientnet_b0", 224, 10),
    ("convnext_tiny", 224, 10), ("vit_b_16", 224, 10), ("densenet121", 224, 5),
    ("regnet_y_400mf", 224, 10), ("cifar_resnet20", 32, 8), ("cifar_resnet56", 32, 10), ("cifar_resnet110", 32, 10),
]


@pytest.mark.parametrize(("arch", "size", "fewest"), REAL_SIZE)
def test_candidates_by_cost_at_real_size(arch, size, fewest):
    """No candidate before 5% of the cumulative FLOPs or with under 5% after it; every rejection has a reason."""
    torch.manual_seed(0)
    model = cifar_resnet(arch) if arch.startswith("cifar") else torchvision.models.get_model(arch, weights=None)
    table = candidate_table(model.eval(), torch.zeros(1, 3, size, size))
    kept = [e for e in table if e.kept]
    assert fewest <= len(kept) <= 10
    assert all(0.05 <= e.cumulative_flops_fraction <= 0.95 for e in kept)
    assert all(e.reason for e in table if not e.kept) and all(e.reason is None for e in kept)
    fractions = [e.cumulative_flops_fraction for e in table if e.cumulative_flops_fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    rows = json.loads(json.dumps([e.to_dict() for e in table]))
    assert all({"name", "shape", "remaining_flops", "cumulative_flops_fraction", "kept"} <= set(r) for r in rows)
    assert all(("reason" in r) != r["kept"] for r in rows)


def test_resnet50_stem_and_last_stage_output_are_rejected():
    """The issue's case: conv1, bn1, relu, maxpool (under 3% of the FLOPs) and layer4 (pooling and fc after it)."""
    table = {e.name: e for e in candidate_table(torchvision.models.resnet50().eval(), torch.zeros(1, 3, 224, 224))}
    for stem in ("conv1", "bn1", "relu", "maxpool"):
        assert not table[stem].kept and "spent before it" in table[stem].reason
    assert not table["layer4"].kept and "remain after it" in table["layer4"].reason
    assert sum(e.kept for e in table.values()) == 10


def test_spread_and_near_duplicates():
    from selfxit.core.candidates import _near_duplicates, _spread
    fractions = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert _spread(fractions, [1] * 9, 3) == [0, 4, 8]
    assert _spread(fractions, [1] * 9, 1) == [4]
    assert _spread(fractions, [1] * 9, 20) == list(range(9))
    assert _spread([0.1, 0.5, 0.5, 0.9], [2, 2, 1, 2], 3) == [0, 2, 3]  # a tie goes to the shallower layer
    assert _near_duplicates([0.06, 0.065, 0.066, 0.2, 0.3, 0.305], 0.01) == [[0, 1, 2], [4, 5]]
