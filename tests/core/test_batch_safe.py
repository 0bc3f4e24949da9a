"""Batch-size reads are not data flow: exits after them, and the traced graph that keeps shrunk batches right."""
import pytest
import torch
from torch import fx, nn

from selfxit.core.candidates import find_candidates
from selfxit.core.exactness import invariant_rows
from selfxit.core.exits import ExitRecord
from selfxit.core.graph import CONSTANT, DATA, SHAPE, articulation_modules, batch_safe_module, classify, trace
from selfxit.core.runtime import FINAL, EarlyExitRunner


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class ReadsBatchFirst(nn.Module):
    """Reads the batch size before its blocks and uses it after them, as EfficientNet-Lite's forward does,
    in every spelling: ``size(0)``, ``shape`` unpacking, ``size(-4)``, and a tensor made from it."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(8) for _ in range(4)])
        self.fc = nn.Linear(8 * 4 * 4 + 1, classes)
        self.extra = nn.Parameter(torch.ones(1, 1))

    def forward(self, x):
        bs = x.size(0)
        n, _, _, _ = x.shape
        back = x.size(-4)
        bias = self.extra.expand(bs, 1)  # made from the batch size and a parameter: a shape value, not data
        x = self.blocks(self.stem(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).view(bs, -1).reshape(n, -1).view(back, -1)
        return self.fc(torch.cat([x, bias], dim=1))


class OptionalArguments(nn.Module):
    """Optional arguments that reach every block when traced as inputs (like timm's attn_mask, is_causal)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8) for _ in range(4)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x, mask=None, causal: bool = False):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x) if mask is None else block(x) * mask
            if causal:
                x = x.tril()
        return self.fc(x.mean((2, 3)))


def test_batch_reads_are_shape_values_not_data():
    graph = trace(ReadsBatchFirst())
    kinds = classify(graph)
    by_name = {node.name: kinds[node] for node in graph.nodes}
    assert by_name["x"] == DATA and by_name["size"] == SHAPE and by_name["getattr_1"] == SHAPE
    assert by_name["expand"] == SHAPE  # self.extra.expand(bs, 1)
    assert by_name["fc"] == DATA
    assert [name for name, _ in articulation_modules(ReadsBatchFirst())] == [
        "stem", "blocks.0", "blocks.1", "blocks.2", "blocks", "fc"]  # blocks.3 ends where blocks does


def test_optional_arguments_are_constants():
    graph = trace(OptionalArguments())
    kinds = classify(graph)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    assert [kinds[p] for p in placeholders] == [DATA, CONSTANT, CONSTANT]
    names = [c.name for c in find_candidates(OptionalArguments(), torch.randn(2, 3, 8, 8))]
    assert names == ["stem", "blocks.0", "blocks.1", "blocks.2"]  # blocks.3 leaves only pooling and fc


def test_model_without_batch_reads_runs_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Block(4), Block(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert batch_safe_module(model, ["1", "2"]) is model
    assert batch_safe_module(ReadsBatchFirst(), []) is not None


@pytest.mark.parametrize("exits", [["blocks.0"], ["stem", "blocks.2"], ["blocks.0", "blocks.1", "blocks.3"]])
def test_shrunk_batches_get_the_backbone_answer(exits):
    torch.manual_seed(0)
    model = ReadsBatchFirst().eval()
    x = torch.randn(6, 3, 8, 8)
    safe = batch_safe_module(model, exits)
    assert isinstance(safe, fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(safe(x), model(x))  # nothing shrinks: the same computation
        modules = dict(model.named_modules())
        keep = [torch.tensor([0, 2, 3, 5]), torch.tensor([1, 3]), torch.tensor([0])][: len(exits)]
        handles = [modules[name].register_forward_hook(lambda _m, _i, out, rows=rows: out[rows])
                   for name, rows in zip(exits, keep)]
        try:
            with pytest.raises(RuntimeError):
                model(x)  # the plain model's view(bs, -1) breaks on the shrunk batch
            out = safe(x)
        finally:
            for handle in handles:
                handle.remove()
        rows = torch.arange(6)
        for k in keep:
            rows = rows[k]
        expected = model(x)[rows]
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-6)


class RowHead(nn.Module):
    """An exit head that fires (confidence ~1) exactly for the rows of the original batch in ``rows``: it
    recognises a row by its activation, recorded on the full batch (nearest neighbour)."""

    def __init__(self, reference: torch.Tensor, rows: set[int], classes: int):
        super().__init__()
        self.reference, self.rows, self.classes = reference.flatten(1), set(rows), classes

    def forward(self, activation):
        which = torch.cdist(activation.flatten(1), self.reference).argmin(dim=1)
        logits = torch.zeros(len(activation), self.classes)
        for i, row in enumerate(which.tolist()):
            if row in self.rows:
                logits[i, row % self.classes] = 50.0
        return logits


def run_cascade(model, x, exits, rows_per_exit, classes):
    """Run ``model`` on ``x`` through EarlyExitRunner with RowHead exits; check every answer against the
    backbone's own. Samples that exit nowhere get the backbone's prediction and its logits up to the last
    bits: CPU GEMM kernels can round differently for another batch size (the plain model on 4 of 6 rows
    differs from the full batch in the 7th digit too). They are bit-exact against the plain backbone run on
    just those rows (padded with copies of the first, as the runner pads them). Returns the output and how many logits
    were bit-exact against the full batch's."""
    modules = dict(model.named_modules())
    reference = {}
    handles = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: reference.__setitem__(name, out))
               for name in exits]
    try:
        with torch.no_grad():
            backbone = model(x)
    finally:
        for handle in handles:
            handle.remove()
    records = [ExitRecord(name, RowHead(reference[name], rows, classes), threshold=0.5)
               for name, rows in zip(exits, rows_per_exit)]
    out = EarlyExitRunner(model, records, classes)(x)
    exact = 0
    scale = backbone.abs().max().item()
    for row in range(len(x)):
        first = next((k for k, rows in enumerate(rows_per_exit) if row in rows), FINAL)
        assert int(out.exit[row]) == first, (row, rows_per_exit)
        if first == FINAL:
            assert int(out.predictions[row]) == int(backbone[row].argmax()), row
            assert torch.allclose(out.logits[row], backbone[row], rtol=1e-5, atol=1e-6 * scale), row
            exact += int(torch.equal(out.logits[row], backbone[row]))
        else:
            assert int(out.predictions[row]) == row % classes
    final = torch.nonzero(out.exit == FINAL).flatten()
    if len(final):
        with torch.no_grad():
            padded_to = min(len(x), invariant_rows(model, x[:1]))  # as the runner pads its survivors
            rows = torch.cat([final, final[:1].repeat(max(padded_to - len(final), 0))])
            alone = model(x[rows])[: len(final)]
        assert torch.equal(out.logits[final], alone)
    return out, exact


def test_runner_with_batch_reads():
    torch.manual_seed(0)
    model = ReadsBatchFirst().eval()
    x = torch.randn(6, 3, 8, 8)
    run_cascade(model, x, ["blocks.0", "blocks.2"], [{0, 4}, {1, 2, 3}], 5)  # a lone survivor runs padded
    run_cascade(model, x, ["blocks.0", "blocks.2"], [set(), {0, 1, 2, 3, 4, 5}], 5)  # all exit: backbone stops
    run_cascade(model, x, ["blocks.1"], [set()], 5)


def test_traced_graph_shares_the_model_and_leaves_it_as_found():
    model = ReadsBatchFirst().train()
    model.blocks[1].eval()
    flags = [m.training for m in model.modules()]
    safe = batch_safe_module(model, ["blocks.1"])
    assert isinstance(safe, fx.GraphModule) and [m.training for m in model.modules()] == flags
    assert safe.get_submodule("blocks.1") is model.blocks[1]  # hooks on the model's module fire in the graph
    assert safe.get_parameter("fc.weight") is model.fc.weight
