"""Candidate exit layers: graph articulation points, filters, fallback, user overrides, torchvision models."""
import json

import pytest
import torch
import torchvision
from torch import nn

from selfxit.core.candidates import Candidate, articulation_modules, find_candidates
from selfxit.zoo.cifar_resnet import cifar_resnet
from selfxit.core.flops import count_flops


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
    assert _names(candidates) == ["stem", "block", "conv"]  # no-ops dropped, then pool and fc as the last two
    assert candidates[1].shape == (4, 8, 8)
    _exits_shrink_batch(model.eval(), torch.randn(2, 3, 8, 8), candidates)


def test_cifar_resnet56_candidates():
    model = cifar_resnet("cifar_resnet56")
    model.train()
    before = _hooks(model)
    x = torch.randn(2, 3, 32, 32)
    candidates = find_candidates(model, x)
    assert _hooks(model) == before
    assert _names(candidates) == [
        "conv1", "bn1", "layer1.2", "layer1.6", "layer1",
        "layer2.2", "layer2.6", "layer2", "layer3.2", "layer3.6",
    ]
    shapes = {"conv1": (16, 32, 32), "bn1": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16)}
    shapes["layer3"] = (64, 8, 8)
    assert all(c.shape == shapes[c.name.split(".")[0]] for c in candidates)
    remaining = [c.remaining_flops for c in candidates]
    assert all(a > b > 0 for a, b in zip(remaining, remaining[1:]))
    total = count_flops(model, x)
    assert remaining[0] == total - 2 * 27 * 16 * 32 * 32  # all but conv1's own convolution
    assert json.loads(json.dumps(candidates[0].to_dict())) == {
        "name": "conv1", "shape": [16, 32, 32], "remaining_flops": remaining[0]
    }
    _exits_shrink_batch(model.eval(), x, candidates)


def test_cap_samples_first_level_evenly():
    candidates = find_candidates(cifar_resnet("cifar_resnet20"), torch.randn(1, 3, 32, 32), max_candidates=2)
    assert _names(candidates) == ["bn1", "layer2"]  # from conv1, bn1, layer1, layer2
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
    with pytest.raises(Exception):
        articulation_modules(model)
    with pytest.warns(UserWarning, match="could not trace Branchy"):
        candidates = find_candidates(model, torch.randn(2, 3, 8, 8))
    assert _names(candidates) == ["stem", "block", "conv"]
    assert _hooks(model) == _hooks(Branchy())


def test_in_place_activation_is_kept_but_no_ops_are_not():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Dropout(), nn.Identity(),
        nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2),
    )
    assert _names(find_candidates(model, torch.randn(1, 3, 6, 6))) == ["0", "1"]


TORCHVISION = [
    ("resnet18", 32), ("resnet50", 32), ("mobilenet_v3_large", 32),
    ("efficientnet_b0", 32), ("convnext_tiny", 32), ("vit_b_16", 224),
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
    _exits_shrink_batch(model, x, candidates)
