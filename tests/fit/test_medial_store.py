"""The bounded, sharded medial store: reductions that equal the heads' first op, the byte budget, shards on
folders and fsspec URLs, damage and interruption, and streamed distillation."""
import os
import subprocess
import sys
import textwrap
import uuid

import fsspec
import numpy as np
import pytest
import torch
from torch import nn

import selfxit
from selfxit.core.heads import (
    DEFAULT_HEAD,
    FULL,
    build_head,
    can_feed,
    head_input,
    input_reduction,
    reduced_shape,
    reducer,
    stored_stage,
)
from selfxit.fit.distill import DistillConfig, distill_head, head_logits, stem_features
from selfxit.fit.medial import MedialDataset, MedialIncompleteWarning, MedialShardError, MedialStoreError
from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET, MedialBudgetError, plan_storage, stored_bytes
from selfxit.fit.record import record

CONV = {"kind": "conv_linear", "convs": [{"out": 8, "kernel": 3, "stride": 2}], "pool": 1, "hidden": [16]}
CONV_GRID = {**CONV, "input_grid": 8}
RESNET50 = [("conv1", (64, 112, 112)), ("bn1", (64, 112, 112)), ("relu", (64, 112, 112)), ("maxpool", (64, 56, 56)),
            ("layer1", (256, 56, 56)), ("layer2.1", (512, 28, 28)), ("layer2", (512, 28, 28)),
            ("layer3.4", (1024, 14, 14)), ("layer3", (1024, 14, 14)), ("layer4", (2048, 7, 7))]


# ---- the stored reduction is the head's first op -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 7, 7), (8, 8, 8), (8, 14, 14), (8, 5, 9), (8, 2, 3), (6, 10), (12,)])
@pytest.mark.parametrize("spec", [DEFAULT_HEAD, {"kind": "pool_mlp", "pool": 2, "hidden": []},
                                  {"kind": "pool_mlp", "hidden": [8], "tokens": "cls_mean"}, CONV_GRID,
                                  {"kind": "conv_linear", "convs": [], "pool": 3, "hidden": [8]}])
def test_head_on_full_map_equals_head_on_stored_reduction(shape, spec):
    """Applied to the full map or to the stored reduction, a head gives bit-identical logits (float32)."""
    if len(shape) != 3 and spec.get("convs"):
        pytest.skip("conv heads need (C,H,W)")
    torch.manual_seed(0)
    head = build_head(spec, shape, 10).eval()
    reduction = input_reduction(spec, shape)
    assert head_input(head, shape)[0] == reduction  # the module and the spec agree on the input
    x = torch.randn(5, *shape)
    with torch.no_grad():
        stored = reducer(shape, reduction)(x)
        assert tuple(stored.shape[1:]) == reduced_shape(shape, reduction)
        assert torch.equal(stored_stage(head, shape, reduction)(stored), head(x))
        assert torch.equal(stored_stage(head, shape, FULL)(x), head(x))  # full maps feed every head


def test_default_reduction_on_resnet50_maps():
    """7x7 -> 4x4 does not divide: the stored op is the head's AdaptiveAvgPool2d, overlapping windows and all."""
    head = build_head(DEFAULT_HEAD, (2048, 7, 7), 1000)
    assert isinstance(head[0], nn.AdaptiveAvgPool2d)
    assert isinstance(reducer((2048, 7, 7), input_reduction(DEFAULT_HEAD, (2048, 7, 7))), nn.AdaptiveAvgPool2d)
    assert isinstance(reducer((512, 28, 28), input_reduction(DEFAULT_HEAD, (512, 28, 28))), nn.AvgPool2d)
    total = sum(stored_bytes(shape) for _, shape in RESNET50)
    assert total == 180_224 <= 0.5e6  # 176 KiB per row for all ten candidates (full maps: 9.4 MB)
    assert sum(stored_bytes(shape, "full") for _, shape in RESNET50) == 9_433_088
    assert total <= DEFAULT_ROW_BUDGET


def test_nested_grids_feed_coarser_heads_and_finer_ones_are_refused():
    shape = (4, 8, 8)
    stored = input_reduction(DEFAULT_HEAD, shape)  # 4x4
    coarse = build_head({"kind": "pool_mlp", "pool": 2, "hidden": []}, shape, 3).eval()
    x = torch.randn(6, *shape)
    with torch.no_grad():
        got = stored_stage(coarse, shape, stored)(reducer(shape, stored)(x))
        assert torch.allclose(got, coarse(x), atol=1e-6)  # equal windows nest: the same average
    assert can_feed(shape, stored, input_reduction({"kind": "pool_mlp", "pool": 1}, shape))
    assert not can_feed((4, 7, 7), input_reduction(DEFAULT_HEAD, (4, 7, 7)),  # 7 -> 4 -> 2 does not nest
                        input_reduction({"kind": "pool_mlp", "pool": 2}, (4, 7, 7)))
    for finer in (CONV, {"kind": "pool_mlp", "pool": 8}):
        assert not can_feed(shape, stored, input_reduction(finer, shape))
        with pytest.raises(ValueError, match="collect again"):
            stored_stage(build_head(finer, shape, 3), shape, stored)


def test_input_grid_declares_a_conv_heads_resolution():
    assert input_reduction(CONV, (16, 32, 32)) == FULL
    assert input_reduction(CONV_GRID, (16, 32, 32)) == {"reduce": "grid", "grid": [8, 8]}
    head = build_head(CONV_GRID, (16, 32, 32), 10)
    assert isinstance(head[0], nn.AvgPool2d) and isinstance(head[1], nn.Conv2d)
    assert stored_bytes((16, 32, 32), CONV_GRID) == 16 * 64 * 2
    assert stored_bytes((16, 32, 32), CONV) == 16 * 32 * 32 * 2
    with pytest.raises(ValueError, match="input_grid"):
        build_head({**CONV, "input_grid": 0}, (16, 32, 32), 10)
    with pytest.raises(ValueError, match="tokens"):
        build_head({"kind": "pool_mlp", "tokens": "max"}, (5, 8), 10)


# ---- the byte budget -----------------------------------------------------------------------------------------

def test_stored_bytes_api():
    assert stored_bytes((2048, 7, 7), DEFAULT_HEAD, DEFAULT_ROW_BUDGET) == 2048 * 16 * 2
    assert stored_bytes((2048, 7, 7)) == 2048 * 16 * 2  # None: the default head
    assert stored_bytes((2048, 7, 7), {"reduce": "grid", "grid": [2, 2]}) == 2048 * 4 * 2
    assert stored_bytes((197, 768), DEFAULT_HEAD) == 768 * 2  # token mean
    assert stored_bytes((197, 768), {"kind": "pool_mlp", "tokens": "cls_mean"}) == 2 * 768 * 2
    assert stored_bytes((1000,), DEFAULT_HEAD, dtype="float32") == 4000
    with pytest.raises(MedialBudgetError, match="full 256x56x56 activation takes 1,605,632 bytes"):
        stored_bytes((256, 56, 56), CONV, budget=DEFAULT_ROW_BUDGET)


def test_plan_storage_names_the_costly_layers_and_the_fix():
    names, shapes = zip(*RESNET50)
    plan = plan_storage(list(names), list(shapes))
    assert plan.bytes_per_row == 180_224 and plan.stored_shapes[-1] == (2048, 4, 4)
    with pytest.raises(MedialBudgetError) as err:
        plan_storage(list(names), list(shapes), {"layer1": CONV})
    message = str(err.value)
    assert "layer1: full 256x56x56 activation, 1,605,632 bytes" in message
    assert "input_grid" in message and "budget=" in message
    ok = plan_storage(list(names), list(shapes), {"layer1": {**CONV, "input_grid": 14}})
    assert ok.bytes_per_row == 180_224 - 8192 + 256 * 14 * 14 * 2
    with pytest.raises(ValueError, match="unknown layers"):
        plan_storage(list(names), list(shapes), {"layer9": CONV})


# ---- recording, reading and training ---------------------------------------------------------------------------

class Tiny(nn.Module):
    """A small conv net whose middle candidate is 7x7 (the non-dividing case) and whose stem has an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.down(self.act(self.bn(self.conv(x)))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 14, 14), candidate_layers=["bn", "down"])
    assert [c.shape for c in ee.candidates] == [(8, 14, 14), (16, 7, 7)]
    return ee, torch.randn(60, 3, 14, 14)


def _full_maps(model, x):
    out = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.clone()))
             for n in ("bn", "down")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_recorded_rows_give_the_runtime_logits(tiny, tmp_path):
    """float32 storage: a head on stored rows gives exactly the logits of the same head on the live map (also for
    a BatchNorm candidate followed by an in-place ReLU: the reduction happens in the hook)."""
    ee, x = tiny
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=60)
    layers, shapes = [c.name for c in ee.candidates], [c.shape for c in ee.candidates]
    ds = record(ee.backbone, layers, shapes, 5, loader, 60, tmp_path / "m", augment_copies=0, progress=False,
                dtype="float32", heads=DEFAULT_HEAD)
    assert ds.meta.stored_shapes == [(8, 4, 4), (16, 4, 4)]
    full = _full_maps(ee.backbone, x)
    for name, shape in zip(layers, shapes):
        torch.manual_seed(1)
        head = build_head(DEFAULT_HEAD, shape, 5).eval()
        with torch.no_grad():
            live = head(full[name])
        assert torch.equal(head_logits(head, ds, name, np.arange(60)), live), name


def test_collect_stores_full_maps_when_they_fit_else_the_default_heads_input(tiny, tmp_path):
    ee, x = tiny
    full = ee.collect(x, tmp_path / "a", augment_copies=0, progress=False)  # 4,704 bytes per row: full maps fit
    assert full.meta.stored_shapes == [(8, 14, 14), (16, 7, 7)] and sum(full.stored_bytes.values()) == 4704
    grid = ee.collect(x, tmp_path / "b", augment_copies=0, progress=False, budget=4000)
    assert grid.meta.stored_shapes == [(8, 4, 4), (16, 4, 4)] and grid.meta.budget == 4000
    exact = ee.collect(x, tmp_path / "c", augment_copies=0, progress=False, heads=DEFAULT_HEAD)
    assert exact.meta.stored_shapes == [(8, 4, 4), (16, 4, 4)]  # given heads: exactly what they consume
    for a, b in ((full, grid), (grid, exact)):  # the default head trains to the same logits on each
        head = build_head(DEFAULT_HEAD, (16, 7, 7), 5).eval()
        assert torch.allclose(head_logits(head, a, "down", np.arange(60)), head_logits(head, b, "down", np.arange(60)),
                              atol=1e-2)
    names, shapes = zip(*RESNET50)
    assert plan_storage(list(names), list(shapes)).bytes_per_row == 180_224  # large maps: the default head's input
    assert plan_storage(list(names), list(shapes), budget=None).bytes_per_row == 9_433_088  # no cap: full maps


def test_streamed_distillation_equals_in_memory(tiny, tmp_path):
    ee, x = tiny
    ds = ee.collect(x, tmp_path / "m", augment_copies=1, batch_size=4, progress=False, shard_mb=0.002,
                    heads=DEFAULT_HEAD)
    assert len(ds.shards) > 5  # rows spread over many shards
    rows = ds.indices("train")
    heads = []
    for memory_mb in (64, 0):  # everything in memory, or every batch read from the shards
        torch.manual_seed(3)
        head = build_head(DEFAULT_HEAD, (16, 7, 7), 5)
        config = DistillConfig(epochs=3, batch_size=8, memory_mb=memory_mb)
        heads.append(distill_head(head, ds, "down", rows, config, progress=False))
        stem = head[:2]
        assert stem_features(stem, ds, "down", rows, memory_mb).in_memory == (memory_mb > 0)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        assert torch.equal(a, b)


def test_reads_across_shards_in_any_order(tiny, tmp_path):
    ee, x = tiny
    big = ee.collect(x, tmp_path / "one", augment_copies=1, batch_size=4, progress=False)
    small = ee.collect(x, tmp_path / "many", augment_copies=1, batch_size=4, progress=False, shard_mb=0.003)
    assert len(big.shards) == 1 and len(small.shards) > 3
    np.testing.assert_array_equal(big.source, small.source)
    np.testing.assert_array_equal(big.split, small.split)
    rows = np.random.default_rng(0).permutation(big.meta.num_samples)[:50]
    rows = np.r_[rows, rows[:5]]  # repeated rows too
    for name in ("bn", "down"):
        np.testing.assert_array_equal(big.activations(name, rows), small.activations(name, rows))
        got = torch.cat([x for x, _, _ in small.batches(name, rows, batch_size=7)])
        assert torch.equal(got, torch.from_numpy(big.activations(name, rows)).float())
    assert torch.equal(big.teacher(rows), small.teacher(rows))
    assert torch.equal(small.top1(rows, batch_size=4), big.teacher(rows).argmax(1))


def test_collect_to_an_fsspec_url_and_fit(tiny):
    ee, x = tiny
    url = f"memory://selfxit-test-{uuid.uuid4().hex}/medial"
    ds = ee.collect(x, url, augment_copies=1, batch_size=8, progress=False, shard_mb=0.004, heads=DEFAULT_HEAD)
    assert ds.location == url and ds.complete and len(ds.shards) > 1
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.find(url.split("://")[1])}
    assert {"manifest.json", "recording.json", "w0.json"} <= names and not any(n.startswith(".tmp") for n in names)
    again = MedialDataset(url)
    assert again.meta.num_samples == ds.meta.num_samples and again.stored_bytes == {"bn": 256, "down": 512}
    report = ee.fit(0.1, distill=DistillConfig(epochs=2), method="joint", near_chance_margin=-1, progress=False)
    assert {h.layer for h in report.heads} == {"bn", "down"}


def test_collect_with_dataloader_workers_records_the_same_rows(tiny, tmp_path):
    ee, x = tiny
    data = torch.utils.data.TensorDataset(x)
    a = ee.collect(torch.utils.data.DataLoader(data, batch_size=16), tmp_path / "a", progress=False)
    b = ee.collect(torch.utils.data.DataLoader(data, batch_size=16, num_workers=2), tmp_path / "b", progress=False)
    np.testing.assert_array_equal(a.source, b.source)
    for name in ("bn", "down"):
        np.testing.assert_array_equal(a.activations(name), b.activations(name))


def test_fit_refuses_heads_whose_input_was_not_stored(tiny, tmp_path):
    ee, x = tiny
    ee.collect(x, tmp_path / "m", progress=False, heads=DEFAULT_HEAD)
    with pytest.raises(ValueError, match=r"'bn' needs the full 8x14x14 activation but the dataset stored the 4x4"):
        ee.fit(0.1, heads=CONV, progress=False)
    ee.collect(x, tmp_path / "m", progress=False, heads=CONV)  # the heads declare what they read
    assert ee.medial.meta.stored_shapes == [(8, 14, 14), (16, 7, 7)]
    ee.fit(0.1, heads=CONV, distill=DistillConfig(epochs=1), method="joint", near_chance_margin=-1, progress=False)


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_budget_too_small_fails_before_anything_is_written(tiny, tmp_path):
    ee, x = tiny
    with pytest.raises(MedialBudgetError, match=r"'?bn'?: full 8x14x14 activation, 3,136 bytes.*budget="):
        ee.collect(x, tmp_path / "m", heads="full", budget=2000, progress=False)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("where", ["file", "protocol"])
def test_unwritable_location_is_a_clear_error(tiny, tmp_path, where):
    ee, x = tiny
    if where == "file":
        (tmp_path / "f").write_text("a file, not a folder")
        url, expect = str(tmp_path / "f" / "medial"), "cannot write the medial dataset to"
    else:
        url, expect = "nosuchprotocol://bucket/medial", "fsspec backend"
    with pytest.raises(MedialStoreError, match=expect):
        ee.collect(x, url, progress=False)
    assert (tmp_path / "f").read_text() == "a file, not a folder" if where == "file" else True


def _collect_small_shards(ee, x, root):
    return ee.collect(x, root, augment_copies=1, batch_size=4, progress=False, shard_mb=0.004)


def test_missing_shard_is_named_and_the_rest_can_be_read(tiny, tmp_path):
    ee, x = tiny
    ds = _collect_small_shards(ee, x, tmp_path / "m")
    n, lost = ds.meta.num_samples, ds.shards[1]
    os.remove(lost.path)
    with pytest.raises(MedialShardError, match=rf"shard {os.path.basename(lost.path)} is missing .*on_bad_shard='skip'"):
        MedialDataset(tmp_path / "m")
    with pytest.warns(MedialIncompleteWarning, match=f"{lost.rows:,} rows"):
        rest = MedialDataset(tmp_path / "m", on_bad_shard="skip")
    assert rest.meta.num_samples == n - lost.rows
    assert rest.activations("down").shape[0] == n - lost.rows


@pytest.mark.parametrize("damage", ["header", "truncate", "row"])
def test_damaged_shard_is_named(tiny, tmp_path, damage):
    ee, x = tiny
    ds = _collect_small_shards(ee, x, tmp_path / "m")
    shard = ds.shards[2]
    data = bytearray(open(shard.path, "rb").read())
    if damage == "header":
        data[20] ^= 0xFF
    elif damage == "truncate":
        data = data[:-10]
    else:
        data[shard.arrays["act_1"]["offset"] + 3] ^= 0xFF  # inside row 0 of the 'down' activations
    open(shard.path, "wb").write(bytes(data))
    name = os.path.basename(shard.path)
    if damage != "row":  # found on opening
        with pytest.raises(MedialShardError, match=name):
            MedialDataset(tmp_path / "m")
        with pytest.warns(MedialIncompleteWarning, match=name):
            assert MedialDataset(tmp_path / "m", on_bad_shard="skip").meta.num_samples == \
                ds.meta.num_samples - shard.rows
        return
    again = MedialDataset(tmp_path / "m")  # found when the row is read, or by verify()
    with pytest.raises(MedialShardError, match=f"{name} is damaged: row 0 of act_1 fails its checksum"):
        again.verify()
    first = int(again._starts[2])
    with pytest.raises(MedialShardError, match=name):
        again.activations("down", [first])
    again.activations("bn", [first])  # other arrays of the row are intact


KILLED = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import selfxit
    from tests.fit.test_medial_store import Tiny

    class Traffic(torch.utils.data.Dataset):
        def __len__(self):
            return 60
        def __getitem__(self, i):
            if i == 40:
                os._exit(3)  # the recorder is killed part-way
            return torch.randn(3, 14, 14, generator=torch.Generator().manual_seed(i))

    torch.manual_seed(0)
    ee = selfxit.wrap(Tiny().eval(), torch.zeros(1, 3, 14, 14), candidate_layers=["bn", "down"])
    ee.collect(torch.utils.data.DataLoader(Traffic(), batch_size=4), {out!r}, augment_copies=1, progress=False,
               shard_mb=0.004, heads={{"kind": "pool_mlp", "pool": 4, "hidden": [256]}})
""")


def test_killed_recorder_leaves_complete_shards_and_says_how_many_rows_were_lost(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = KILLED.format(root=root, out=str(tmp_path / "m"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not (tmp_path / "m" / "manifest.json").exists()
    with pytest.warns(MedialIncompleteWarning, match=r"incomplete .* rows lost") as warned:
        ds = MedialDataset(tmp_path / "m")
    assert 0 < ds.meta.num_samples < ds.meta.expected_rows
    assert ds.lost_rows == ds.meta.expected_rows - ds.meta.num_samples
    assert f"{ds.lost_rows:,} rows lost" in str(warned[0].message)
    assert ds.source.max() < 40  # what was read back came before the kill ...
    assert ds.activations("down").shape == (ds.meta.num_samples, 16, 4, 4)  # ... and every row reads back
