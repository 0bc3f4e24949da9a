"""FLOPs counted with DeepSpeed's profiler: exact small cases, cumulative totals, model left untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfxit.core.flops import count_flops, cumulative_flops
from selfxit.zoo.cifar_resnet import cifar_resnet


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
    count_flops(model, torch.randn(2, 3, 32, 32), counter="torch")
    cumulative_flops(model, torch.randn(2, 3, 32, 32), ["layer1", "layer2"], counter="torch")
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


# ---- the two counters against each other --------------------------------------------------------

class ListStrideConv(nn.Conv2d):
    """A conv keeping its stride as a list, like efficientnet-lite-pytorch's Conv2dStaticSamePadding:
    DeepSpeed's conv formula raises TypeError on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stride = list(self.stride)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_module_deepspeed_cannot_count_falls_back_to_torch(monkeypatch):
    from selfxit.core import flops
    monkeypatch.setattr(flops, "_warned", set())
    model = nn.Sequential(ListStrideConv(3, 8, 3, stride=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 49, 4))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError):
        count_flops(model, x, counter="deepspeed")
    expected = 2 * 27 * 8 * 49 + 2 * 8 * 49 * 4  # the conv and the linear layer (torch counts no ReLU)
    with pytest.warns(UserWarning, match="DeepSpeed's flops profiler failed on Sequential.*TypeError"):
        assert count_flops(model, x) == expected
    total, reached = cumulative_flops(model, x, ["0", "1"])
    assert total == expected and reached == {"0": 2 * 27 * 8 * 49, "1": 2 * 27 * 8 * 49}
    with pytest.raises(ValueError, match="counter"):
        count_flops(model, x, counter="fvcore")


def test_counters_agree_on_convolutions_and_linear_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 8, 3, bias=False), nn.Flatten(),
                          nn.Linear(8 * 12 * 12, 10))
    x = torch.randn(1, 3, 16, 16)
    assert count_flops(model, x, counter="deepspeed") == count_flops(model, x, counter="torch")


def test_torch_counter_sees_attention_on_cpu():
    """Under no_grad nn.MultiheadAttention takes a fused path FlopCounterMode cannot see, and on CPU its
    scaled_dot_product_attention kernel has no formula in torch: both are handled."""
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    model = SelfAttention().eval().requires_grad_(False)
    x = torch.randn(1, 5, 16)
    projections = 2 * 5 * (3 * 16 * 16 + 16 * 16)
    attention = 2 * 2 * (5 * 5 * 16)  # q k^T and attention x v, two heads of 8
    assert count_flops(model, x, counter="torch") == projections + attention == count_flops(model, x, counter="deepspeed")
    assert not any(p.requires_grad for p in model.parameters())


def _comparison_model(arch):
    import torchvision
    torch.manual_seed(0)
    if arch.startswith("cifar"):
        return cifar_resnet(arch).eval(), 32
    return torchvision.models.get_model(arch, weights=None).eval(), 224 if arch == "vit_b_16" else 64


# (model, lowest torch/DeepSpeed total ratio): torch's counter leaves out norms, activations and pooling, which
# cost more in the mobile networks (hard-swish, SiLU, squeeze-excitation) than in ResNets.
COMPARED = [("cifar_resnet20", 0.99), ("cifar_resnet56", 0.99), ("resnet18", 0.99), ("resnet50", 0.99),
            ("mobilenet_v3_large", 0.95), ("efficientnet_b0", 0.95), ("convnext_tiny", 0.99),
            ("densenet121", 0.98), ("regnet_y_400mf", 0.97), pytest.param("vit_b_16", 0.99, marks=pytest.mark.slow)]


@pytest.mark.parametrize(("arch", "lowest"), COMPARED)
def test_counters_compared(arch, lowest):
    """Totals within a few percent (torch never above DeepSpeed), and the cumulative FLOPs fractions at the
    candidate layers (what picks them) within 1.5 points."""
    from selfxit.core.candidates import find_candidates
    model, size = _comparison_model(arch)
    x = torch.zeros(1, 3, size, size)
    deepspeed = count_flops(model, x, counter="deepspeed")
    torch_total = count_flops(model, x, counter="torch")
    assert lowest * deepspeed <= torch_total <= deepspeed
    names = [c.name for c in find_candidates(model, x)]
    ds_total, ds_reached = cumulative_flops(model, x, names, counter="deepspeed")
    tc_total, tc_reached = cumulative_flops(model, x, names, counter="torch")
    assert (ds_total, tc_total) == (deepspeed, torch_total)
    for name in names:
        assert abs(ds_reached[name] / ds_total - tc_reached[name] / tc_total) < 0.015, name
