"""FLOPs counted with DeepSpeed's profiler: exact small cases, cumulative totals, model left untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfxit.zoo.cifar_resnet import cifar_resnet
from selfxit.core.flops import count_flops, cumulative_flops


def _state(model: nn.Module) -> list:
    """Everything counting could disturb: modes, requires_grad, hooks and instance attributes."""
    return [
        (name, m.training, sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ] + [(name, p.requires_grad) for name, p in model.named_parameters()]


def test_linear_counts_two_flops_per_mac_and_ignores_bias():
    # 64 * 10 MACs; DeepSpeed does not count a linear layer's bias.
    assert count_flops(nn.Linear(64, 10), torch.randn(1, 64)) == 2 * 64 * 10


def test_conv_count_is_per_sample():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 3 * 3 * 3 * 8 * 16 * 16  # kernel * in * out * output positions
    assert count_flops(conv, torch.randn(4, 3, 16, 16)) == 2 * macs  # batch 4 in, one sample counted
    conv_bias = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv_bias, torch.randn(1, 3, 16, 16)) == 2 * macs + 8 * 16 * 16


def test_python_operator_add_is_not_counted():
    class Double(nn.Module):
        def forward(self, x):
            return x + x

    assert count_flops(Double(), torch.randn(1, 8)) == 0


def test_frozen_attention_is_counted():
    # Without params requiring grad, eval-mode attention takes a fused fast path invisible to DeepSpeed.
    d, ff, tokens = 16, 32, 5
    layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=ff, batch_first=True).eval().requires_grad_(False)
    projections = 2 * tokens * (3 * d * d + d * d + 2 * d * ff)  # qkv, out, two feed-forward linears
    assert count_flops(layer, torch.randn(1, tokens, d)) > projections
    assert not any(p.requires_grad for p in layer.parameters())


def test_cumulative_flops_monotone_and_bounded():
    model = cifar_resnet("cifar_resnet20")
    names = ["conv1", "bn1", "layer1.0", "layer1", "layer2", "layer3.1", "layer3", "linear"]
    total, reached = cumulative_flops(model, torch.randn(2, 3, 32, 32), names)
    values = [reached[n] for n in names]
    assert list(reached) == names
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] <= total
    assert total == count_flops(model, torch.randn(1, 3, 32, 32))
    assert reached["conv1"] == 2 * 3 * 3 * 3 * 16 * 32 * 32


def test_cumulative_includes_functionals_of_running_parent():
    # F.relu runs in the top-level forward; its FLOPs must be counted before layer1 fires.
    model = cifar_resnet("cifar_resnet20")
    _, reached = cumulative_flops(model, torch.randn(1, 3, 32, 32), ["bn1", "layer1.0.conv1"])
    conv = 2 * 3 * 3 * 16 * 16 * 32 * 32
    assert reached["layer1.0.conv1"] == reached["bn1"] + 16 * 32 * 32 + conv


def test_model_left_exactly_as_found():
    model = cifar_resnet("cifar_resnet20")
    model.train()
    model.layer2.eval()
    model.conv1.requires_grad_(False)
    before = _state(model)
    original_linear = F.linear
    count_flops(model, torch.randn(2, 3, 32, 32))
    cumulative_flops(model, torch.randn(2, 3, 32, 32), ["layer1", "layer2"])
    assert _state(model) == before
    assert F.linear is original_linear
    assert model.bn1.num_batches_tracked.item() == 0  # ran in eval mode: no running-stat updates
    assert all(p.grad is None for p in model.parameters())


def test_unknown_layer_name_is_rejected():
    model = cifar_resnet("cifar_resnet20")
    with pytest.raises(ValueError, match="layer9.*layer1"):
        cumulative_flops(model, torch.randn(1, 3, 32, 32), ["layer9"])


def test_layer_that_never_runs_is_rejected():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    before = _state(model)
    with pytest.raises(ValueError, match="unused.*never ran"):
        cumulative_flops(model, torch.randn(1, 4), ["used", "unused"])
    assert _state(model) == before


def test_counting_works_inside_inference_mode():
    model = cifar_resnet("cifar_resnet20")
    expected = count_flops(model, torch.randn(1, 3, 32, 32))
    with torch.inference_mode():
        assert count_flops(model, torch.randn(1, 3, 32, 32)) == expected
