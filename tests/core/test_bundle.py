"""Bundles on disk: round trip, atomic replacement, clear errors for damaged bundles, backbone fingerprint."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from selfxit.core import atomic, bundle
from selfxit.core.bundle import MANIFEST, WEIGHTS, BundleError, backbone_fingerprint, load_bundle, save_bundle


def _heads(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer1.0": {"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g)},
        "layer2": {"1.weight": torch.randn(3, 5, generator=g).t(),  # non-contiguous on purpose
                   "2.running_mean": torch.randn(5, generator=g).half(),
                   "2.num_batches_tracked": torch.tensor(7)},
    }


MANIFEST_A = {"exits": [{"layer": "layer1.0", "threshold": 0.875}], "heads": {"layer1.0": {"spec": {"kind": "pool_mlp"}}},
              "tolerance": 0.01, "meta": None}


def _assert_same_heads(got, want):
    assert set(got) == set(want)
    for layer in want:
        assert set(got[layer]) == set(want[layer])
        for key, tensor in want[layer].items():
            assert got[layer][key].dtype == tensor.dtype
            assert torch.equal(got[layer][key], tensor)


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name != name)


def test_round_trip(tmp_path):
    heads = _heads()
    out = save_bundle(tmp_path / "b", MANIFEST_A, heads)
    assert out == tmp_path / "b"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, WEIGHTS])
    manifest, loaded = load_bundle(out)
    assert manifest == {"format_version": bundle.FORMAT_VERSION, **MANIFEST_A}
    _assert_same_heads(loaded, heads)
    assert _leftovers(tmp_path, "b") == []


def test_save_creates_missing_parents_and_replaces_existing(tmp_path):
    path = tmp_path / "deep" / "er" / "b"
    save_bundle(path, MANIFEST_A, _heads(0))
    save_bundle(path, {"tolerance": 0.5}, _heads(1))
    manifest, loaded = load_bundle(path)
    assert manifest == {"format_version": bundle.FORMAT_VERSION, "tolerance": 0.5}
    _assert_same_heads(loaded, _heads(1))
    assert _leftovers(path.parent, "b") == []  # no staging or ".old" folder left behind


def _failing_save_file(tensors, filename, *args, **kwargs):
    with open(filename, "wb") as fh:  # half-written weights ...
        fh.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    raise OSError("disk full")  # ... then the write fails


def _assert_is_bundle_a(path):
    manifest, loaded = load_bundle(path)
    assert manifest["tolerance"] == MANIFEST_A["tolerance"]
    _assert_same_heads(loaded, _heads(0))


def test_failed_save_keeps_previous_bundle(tmp_path, monkeypatch):
    path = tmp_path / "b"
    save_bundle(path, MANIFEST_A, _heads(0))
    monkeypatch.setattr(bundle, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(path, {"tolerance": 0.5}, _heads(1))
    monkeypatch.undo()
    _assert_is_bundle_a(path)
    assert _leftovers(tmp_path, "b") == []


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save_bundle(tmp_path / "b", MANIFEST_A, _heads())
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_keeps_previous_bundle(tmp_path, monkeypatch):
    path = tmp_path / "b"
    save_bundle(path, MANIFEST_A, _heads(0))
    real_replace, calls = atomic.os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> .b.old went through; staging -> b fails
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_bundle(path, {"tolerance": 0.5}, _heads(1))
    monkeypatch.undo()
    _assert_is_bundle_a(path)


def test_missing_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=MANIFEST):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not a selfxit bundle"):
        load_bundle(tmp_path / "nowhere")


def test_corrupt_manifest(tmp_path):
    path = save_bundle(tmp_path / "b", MANIFEST_A, _heads())
    (path / MANIFEST).write_text('{"format_version": 1, "exits": [')
    with pytest.raises(BundleError, match=MANIFEST) as info:
        load_bundle(path)
    assert "not valid JSON" in str(info.value)


def test_wrong_format_version(tmp_path):
    path = save_bundle(tmp_path / "b", MANIFEST_A, _heads())
    (path / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_weights(tmp_path, damage):
    path = save_bundle(tmp_path / "b", MANIFEST_A, _heads())
    weights = path / WEIGHTS
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file at all")
    else:
        weights.unlink()
    with pytest.raises(BundleError, match=WEIGHTS) as info:
        load_bundle(path)
    assert "cannot be read" in str(info.value)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_fingerprint_stable_and_sensitive():
    model = _model()
    fp = backbone_fingerprint(model)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert backbone_fingerprint(model) == fp
    assert backbone_fingerprint(copy.deepcopy(model)) == fp
    assert backbone_fingerprint(_model()) == fp  # same seed, same weights
    model.eval()
    assert backbone_fingerprint(model) == fp  # mode is not part of the state

    with torch.no_grad():
        model[3].weight[1, 2] += 1e-6
    changed = backbone_fingerprint(model)
    assert changed != fp
    with torch.no_grad():
        model[3].weight[1, 2] -= 1e-6
    assert backbone_fingerprint(model) == fp

    model[1].num_batches_tracked += 1  # buffers count too
    assert backbone_fingerprint(model) != fp


def test_fingerprint_sees_dtype_and_shape():
    a = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        a.weight.zero_()
    b = copy.deepcopy(a).double()  # same (zero) values, different dtype
    c = nn.Linear(2, 8, bias=False)  # same number of zero values, different shape
    with torch.no_grad():
        c.weight.zero_()
    assert len({backbone_fingerprint(a), backbone_fingerprint(b), backbone_fingerprint(c)}) == 3


def test_bundle_folder_permissions_follow_umask(tmp_path):
    reference = tmp_path / "plain"
    reference.mkdir()  # what a non-atomic writer would have produced
    path = save_bundle(tmp_path / "b", MANIFEST_A, _heads())
    assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777
