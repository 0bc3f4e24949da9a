"""timm models (a test extra), randomly initialised at 224x224: candidates by cost, optional forward arguments
held as constants, and exits that shrink the batch exactly."""
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is a test extra: pip install timm")

from selfxit.core.candidates import candidate_table  # noqa: E402
from selfxit.core.graph import batch_safe_module  # noqa: E402

# (model, layers that must not be candidates)
MODELS = [
    ("resnet50", ["conv1", "bn1", "act1", "maxpool", "layer4"]),
    ("efficientnet_b0", ["conv_stem", "bn1", "conv_head", "bn2", "global_pool"]),
    ("mobilenetv3_large_100", ["conv_stem", "bn1", "conv_head", "global_pool"]),
    ("convnext_tiny", ["stem", "stages.3", "head"]),
    ("vit_small_patch16_224", ["patch_embed", "blocks.11", "norm"]),
    ("deit_small_patch16_224", ["patch_embed", "blocks.11", "norm"]),
    ("swin_tiny_patch4_window7_224", ["patch_embed", "layers.3", "norm"]),
    ("regnety_016", ["stem", "s4", "final_conv"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "excluded"), MODELS)
def test_timm_candidates_by_cost(name, excluded):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    table = {e.name: e for e in candidate_table(model, torch.zeros(1, 3, 224, 224))}
    kept = [e for e in table.values() if e.kept]
    assert len(kept) == 10, [e.name for e in kept]  # vit/deit: not just blocks.11, as when attn_mask was data
    assert all(0.05 <= e.cumulative_flops_fraction <= 0.95 for e in kept)
    for layer in excluded:
        assert layer not in table or not table[layer].kept, layer

    # Exits at the first, a middle and the last candidate: the rows that go on get the backbone's answer.
    exits = [kept[0].name, kept[len(kept) // 2].name, kept[-1].name]
    safe = batch_safe_module(model, exits)
    modules = dict(model.named_modules())
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = model(x[1:])
        for layer in exits:
            handle = modules[layer].register_forward_hook(lambda _m, _i, out: out[1:])
            try:
                out = safe(x)
            finally:
                handle.remove()
            assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), layer
