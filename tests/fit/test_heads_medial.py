"""Head specs, the on-disk medial dataset, split assignment, augmentation and recording a frozen backbone."""
import numpy as np
import pytest
import torch
from torch import nn

from selfxit.core.heads import DEFAULT_HEAD, TokenMean, build_head, split_stem
from selfxit.fit.medial import SPLITS, MedialDataset, MedialWriter
from selfxit.fit.record import TUNE_FRACTION, assign_splits, augment, record
from selfxit.zoo.cifar_resnet import cifar_resnet
from selfxit.zoo.data import split_indices

CONV = {"kind": "conv_linear", "convs": [{"out": 8, "kernel": 3, "stride": 2}], "pool": 1, "hidden": [16]}


# ---- heads -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 8, 8), (8, 2, 3), (5, 12), (20,)])
@pytest.mark.parametrize("spec", [DEFAULT_HEAD, {"kind": "pool_mlp", "pool": 2, "hidden": []},
                                  {"kind": "pool_mlp", "hidden": [7, 5]}, CONV])
def test_build_head_outputs_logits(shape, spec):
    head = build_head(spec, shape, 10)
    assert isinstance(head, nn.Sequential)
    assert head(torch.randn(3, *shape)).shape == (3, 10)


def test_pool_mlp_layout():
    head = build_head({"kind": "pool_mlp", "pool": 4, "hidden": [32]}, (16, 8, 8), 10)
    assert isinstance(head[0], nn.AvgPool2d) and head[0].kernel_size == (2, 2)  # 8x8 -> 4x4 evenly
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 4 * 4, 32), (32, 10)]
    # The pool never upsamples a small activation.
    small = build_head({"kind": "pool_mlp", "pool": 4, "hidden": []}, (8, 2, 3), 10)
    assert small[0](torch.zeros(1, 8, 2, 3)).shape[-2:] == (2, 3)
    assert small[-1].in_features == 8 * 2 * 3


def test_token_and_vector_heads():
    tokens = build_head({"kind": "pool_mlp", "hidden": [6]}, (5, 12), 4)
    assert isinstance(tokens[0], TokenMean)
    x = torch.randn(2, 5, 12)
    # Averaging over tokens: permuting the tokens does not change the output.
    assert torch.allclose(tokens(x), tokens(x[:, torch.randperm(5)]), atol=1e-6)
    vector = build_head({"kind": "pool_mlp", "hidden": [6]}, (20,), 4)
    assert isinstance(vector[0], nn.Linear) and vector[0].in_features == 20


def test_conv_linear_layout():
    head = build_head(CONV, (4, 16, 16), 10)
    conv, bn, relu = head[0], head[1], head[2]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (4, 8)
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 10)]


def test_conv_linear_shape_bookkeeping_on_odd_sizes():
    spec = {"kind": "conv_linear", "pool": 2, "hidden": [],
            "convs": [{"out": 6, "kernel": 3, "stride": 2}, {"out": 5, "kernel": 1, "stride": 2}]}
    head = build_head(spec, (3, 7, 5), 4)  # 7x5 -> 4x3 -> 2x2
    assert head[-1].in_features == 5 * 2 * 2
    assert head(torch.randn(2, 3, 7, 5)).shape == (2, 4)


def test_build_head_does_not_mutate_spec():
    spec = {"kind": "conv_linear", "convs": [{"out": 8}], "hidden": [4]}
    before = repr(spec)
    build_head(spec, (3, 8, 8), 2)
    assert repr(spec) == before


@pytest.mark.parametrize("spec, problem", [
    ({"kind": "mlp"}, "kind"),
    ({"pool": 4}, "kind"),
    ("pool_mlp", "kind"),
    ({"kind": "pool_mlp", "dropout": 0.1}, "dropout"),
    ({"kind": "pool_mlp", "convs": []}, "convs"),
    ({"kind": "pool_mlp", "hidden": [0]}, "hidden"),
    ({"kind": "conv_linear", "hidden": [64, -3]}, "hidden"),
    ({"kind": "pool_mlp", "hidden": [2.5]}, "hidden"),
])
def test_bad_specs_raise_value_error_naming_the_problem(spec, problem):
    with pytest.raises(ValueError, match=problem):
        build_head(spec, (4, 8, 8), 10)


def test_bad_shapes_and_conv_fit():
    with pytest.raises(ValueError, match="activation shape"):
        build_head(DEFAULT_HEAD, (2, 3, 4, 5), 10)
    with pytest.raises(ValueError, match="does not fit"):
        build_head({"kind": "conv_linear", "convs": [{"out": 4, "stride": 5}]}, (3, 4, 4), 10)


def test_non_positive_pool_is_rejected():
    with pytest.raises(ValueError, match="pool"):
        build_head({"kind": "pool_mlp", "pool": 0, "hidden": [8]}, (4, 8, 8), 10)


@pytest.mark.parametrize("spec, shape, stem_len", [
    (DEFAULT_HEAD, (16, 8, 8), 2),  # pool + flatten
    ({"kind": "pool_mlp", "hidden": [8]}, (5, 12), 1),  # token mean
    ({"kind": "pool_mlp", "hidden": [8]}, (20,), 0),
    (CONV, (4, 16, 16), 0),  # starts with a conv
])
def test_split_stem(spec, shape, stem_len):
    head = build_head(spec, shape, 10).eval()
    stem, body = split_stem(head)
    assert len(stem) == stem_len and len(stem) + len(body) == len(head)
    assert not list(stem.parameters()) and not list(stem.buffers())
    assert sum(p.numel() for p in body.parameters()) == sum(p.numel() for p in head.parameters())
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(body(stem(x)), head(x))


# ---- medial dataset ----------------------------------------------------------------------------------------

def _write_medial(root, n=10, batches=(6, 4), seed=0):
    rng = np.random.default_rng(seed)
    acts = [torch.from_numpy(rng.normal(size=(n, 2, 3, 3)).astype(np.float32)),
            torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32) * 100)]
    probs = torch.from_numpy(rng.dirichlet(np.ones(5), size=n).astype(np.float32))
    split = rng.integers(0, 4, size=n).astype(np.uint8)
    source = rng.permutation(n).astype(np.int64)
    labels = rng.integers(-1, 5, size=n)
    writer = MedialWriter(root, ["a", "b"], [(2, 3, 3), (4,)], n, 5, seed)
    start = 0
    for size in batches:
        rows = slice(start, start + size)
        writer.append([a[rows] for a in acts], probs[rows], split[rows], source[rows], labels[rows])
        start += size
    return writer, acts, probs, split, source, labels


def test_medial_round_trip(tmp_path):
    writer, acts, probs, split, source, labels = _write_medial(tmp_path / "m")
    ds = writer.close()
    again = MedialDataset(tmp_path / "m")
    for d in (ds, again):
        assert d.candidates == ["a", "b"]
        assert d.meta.shapes == [(2, 3, 3), (4,)]
        assert (d.meta.num_samples, d.meta.num_classes, d.meta.seed) == (10, 5, 0)
        for i, name in enumerate(["a", "b"]):
            stored = d.activations(name)
            assert stored.dtype == np.float16 and stored.shape == tuple(acts[i].shape)
            np.testing.assert_array_equal(stored, acts[i].numpy().astype(np.float16))
            np.testing.assert_array_equal(d.activations(i), stored)
            stored[:] = 0  # a private copy: the dataset is read-only
            np.testing.assert_array_equal(d.activations(name), acts[i].numpy().astype(np.float16))
        assert d.probs.dtype == np.float32
        np.testing.assert_array_equal(d.probs, probs.numpy())
        np.testing.assert_array_equal(d.split, split)
        np.testing.assert_array_equal(d.source, source)
        np.testing.assert_array_equal(d.labels, labels)
        for name, code in SPLITS.items():
            np.testing.assert_array_equal(d.indices(name), np.flatnonzero(split == code))
    with pytest.raises(ValueError, match="unknown split"):
        ds.indices("training")


def test_medial_float16_storage_rounds(tmp_path):
    writer, acts, *_ = _write_medial(tmp_path / "m")
    ds = writer.close()
    stored = ds.activations("b").astype(np.float32)
    assert not np.array_equal(stored, acts[1].numpy())  # float16 really is lossy ...
    np.testing.assert_allclose(stored, acts[1].numpy(), rtol=1e-3)  # ... but close


def test_medial_batches_keep_row_order(tmp_path):
    writer, acts, probs, *_ = _write_medial(tmp_path / "m")
    ds = writer.close()
    rows = np.array([7, 2, 5, 0, 9])
    got = list(ds.batches("a", rows, batch_size=2))
    assert [len(chunk) for _, _, chunk in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([chunk for _, _, chunk in got]), rows)
    x = torch.cat([x for x, _, _ in got])
    assert x.dtype == torch.float32 and x.shape == (5, 2, 3, 3)
    assert torch.equal(x, acts[0][rows].half().float())
    assert torch.equal(torch.cat([p for _, p, _ in got]), probs[rows])
    assert torch.equal(ds.teacher(rows), probs[rows])
    assert torch.equal(ds.teacher(), probs)


def test_medial_teacher_of_all_rows_is_a_private_copy(tmp_path):
    writer, *_ = _write_medial(tmp_path / "m")
    ds = writer.close()
    assert not np.shares_memory(ds.teacher().numpy(), ds.probs)


def test_medial_writer_size_checks_and_overwrite(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "stale.npy").write_bytes(b"old")
    writer, acts, probs, split, source, labels = _write_medial(root, batches=(6,))
    assert not (root / "stale.npy").exists()  # an old folder is replaced, not mixed in
    with pytest.raises(ValueError, match="sized for 10"):
        writer.append([a[:5] for a in acts], probs[:5], split[:5], source[:5], labels[:5])
    with pytest.raises(RuntimeError, match="6 of 10"):  # short of its rows: no manifest ...
        writer.close()
    assert not (root / "manifest.json").exists()
    with pytest.warns(UserWarning, match="4 rows lost"):  # ... but the complete rows read back
        partial = MedialDataset(root)
    assert partial.meta.num_samples == 6 and partial.lost_rows == 4 and not partial.complete
    np.testing.assert_array_equal(partial.source, source[:6])
    writer, *_ = _write_medial(root)
    assert writer.close().meta.num_samples == 10


def test_medial_without_meta_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    np.save(tmp_path / "m" / "probs.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        MedialDataset(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a medial dataset"):
        MedialDataset(tmp_path / "missing")


# ---- splits and augmentation -------------------------------------------------------------------------------

def test_assign_splits_deterministic_fractions_and_disjoint():
    n = 2000
    split = assign_splits(n, seed=5)
    assert split.shape == (n,) and set(np.unique(split)) == set(SPLITS.values())
    np.testing.assert_array_equal(assign_splits(n, seed=5), split)
    assert not np.array_equal(assign_splits(n, seed=6), split)
    counts = {name: int((split == code).sum()) for name, code in SPLITS.items()}
    assert counts == {"train": 800, "tune": 200, "val": 400, "test": 600}  # 50% train of which 20% tune
    assert TUNE_FRACTION == 0.2
    # Tune is carved out of the seeded train split; val/test are exactly the seeded ones (disjoint by construction).
    parts = split_indices(n, 5)
    np.testing.assert_array_equal(np.flatnonzero(np.isin(split, [SPLITS["train"], SPLITS["tune"]])), parts["train"])
    np.testing.assert_array_equal(np.flatnonzero(split == SPLITS["val"]), parts["val"])
    np.testing.assert_array_equal(np.flatnonzero(split == SPLITS["test"]), parts["test"])


@pytest.mark.parametrize("n", [1, 10, 37])
def test_assign_splits_small(n):
    split = assign_splits(n, seed=0)
    assert len(split) == n and split.max() <= 3
    np.testing.assert_array_equal(split, assign_splits(n, seed=0))


def test_augment_shape_determinism_and_content():
    x = torch.randn(6, 3, 16, 16)
    before = x.clone()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, before)  # input untouched
    # Without shifts every sample is either itself or its mirror image.
    flipped = augment(x, torch.Generator().manual_seed(3), shift=0)
    for i in range(len(x)):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    # Non-image inputs pass through.
    tokens = torch.randn(4, 5, 8)
    assert augment(tokens, torch.Generator().manual_seed(0)) is tokens


# ---- recording a frozen backbone --------------------------------------------------------------------------

def _bn_state(model):
    return {f"{name}.{key}": t.clone() for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for key, t in m.state_dict().items()}


def test_record_leaves_batchnorm_untouched(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet("cifar_resnet20")
    for m in model.modules():  # non-trivial running statistics, so any update would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(123)
    model.eval()
    before = _bn_state(model)
    assert before
    x = torch.randn(40, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(40) % 10), batch_size=16)
    layers, shapes = ["layer1", "layer2"], [(16, 32, 32), (32, 16, 16)]
    ds = record(model, layers, shapes, 10, loader, 40, tmp_path / "m", seed=0, augment_copies=1, progress=False,
                heads="full")

    after = _bn_state(model)
    assert after.keys() == before.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())  # recording hooks removed

    # What was recorded is the frozen model's own output on the original samples.
    n_train = int((assign_splits(40, 0) == SPLITS["train"]).sum())
    assert ds.meta.num_samples == 40 + n_train
    with torch.no_grad():
        probs = model(x).softmax(1)
        l1 = model.layer1(torch.relu(model.bn1(model.conv1(x))))
        l2 = model.layer2(l1)
    first_batch = np.arange(16)  # the first batch's own rows come first, then its augmented copies
    np.testing.assert_array_equal(ds.source[first_batch], np.arange(16))
    np.testing.assert_array_equal(ds.labels[first_batch], np.arange(16) % 10)
    assert torch.allclose(ds.teacher(first_batch), probs[:16], atol=1e-5)
    for name, ref in (("layer1", l1), ("layer2", l2)):
        stored = torch.from_numpy(ds.activations(name)[first_batch]).float()
        assert torch.allclose(stored, ref[:16], rtol=2e-3, atol=1e-3), name
    # Every sample recorded once, train samples once more (augment_copies=1), and always with its own split.
    sources, counts = np.unique(ds.source, return_counts=True)
    np.testing.assert_array_equal(sources, np.arange(40))
    train = assign_splits(40, 0) == SPLITS["train"]
    np.testing.assert_array_equal(counts, np.where(train, 2, 1))
    np.testing.assert_array_equal(ds.split, assign_splits(40, 0)[ds.source])


def test_record_stores_what_the_default_head_consumes(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet("cifar_resnet20").eval()
    x = torch.randn(20, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=20)
    layers, shapes = ["layer1", "layer3"], [(16, 32, 32), (64, 8, 8)]
    ds = record(model, layers, shapes, 10, loader, 20, tmp_path / "m", augment_copies=0, progress=False,
                heads=DEFAULT_HEAD)
    assert ds.meta.stored_shapes == [(16, 4, 4), (64, 4, 4)]
    assert ds.stored_bytes == {"layer1": 16 * 16 * 2, "layer3": 64 * 16 * 2}
    with torch.no_grad():
        l1 = model.layer1(torch.relu(model.bn1(model.conv1(x))))
        l3 = model.layer3(model.layer2(l1))
    for name, ref in (("layer1", l1), ("layer3", l3)):
        head = build_head(DEFAULT_HEAD, tuple(ref.shape[1:]), 10).eval()
        grid = head[0](ref)  # the head's own first op is what was stored
        np.testing.assert_array_equal(ds.activations(name), grid.half().numpy())


def test_record_refuses_a_model_in_train_mode(tmp_path):
    model = cifar_resnet("cifar_resnet20").train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=4)
    with pytest.raises(RuntimeError, match="eval mode"):
        record(model, ["layer1"], [(16, 32, 32)], 10, loader, 4, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    assert model.training
