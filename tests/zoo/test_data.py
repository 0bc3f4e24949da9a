"""Image folders, splits and the default traffic folder."""
import numpy as np
import pytest
import torch
from PIL import Image

from selfxit.settings import shared_dir
from selfxit.zoo import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, data
from selfxit.zoo.data import CorruptImageError, ImageFolderData, default_traffic_dir, image_transform, split_indices

CIFAR = ModelInfo("cifar", (3, 32, 32), None, IMAGENET_MEAN, IMAGENET_STD, 10)
IMAGENET = ModelInfo("imagenet", (3, 224, 224), 256, IMAGENET_MEAN, IMAGENET_STD, 1000)
SHARED_TRAFFIC = shared_dir() / "data" / "cifar10-test"


def _write_images(folder, n, size=(32, 32), ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 10 % 256, 50, 200)).save(folder / f"{i:03d}.{ext}")


def test_split_indices():
    splits = split_indices(1000, seed=3)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [500, 200, 300]
    joined = np.concatenate(list(splits.values()))
    assert len(np.unique(joined)) == 1000 and sorted(joined) == list(range(1000))
    again, other = split_indices(1000, seed=3), split_indices(1000, seed=4)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["train"], other["train"])
    small = split_indices(7, seed=0, fractions=(0.6, 0.2, 0.2))
    assert sum(len(v) for v in small.values()) == 7
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, seed=0, fractions=(0.5, 0.5, 0.5))


def test_imagefolder_layout_and_max_samples(tmp_path):
    _write_images(tmp_path / "cat", 12)
    _write_images(tmp_path / "ant", 8, ext="jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = ImageFolderData(tmp_path, CIFAR)
    assert ds.classes == ["ant", "cat"] and len(ds) == 20
    assert ds.labels == [0] * 8 + [1] * 12
    x, label, index = ds[9]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and (label, index) == (1, 9)

    a = ImageFolderData(tmp_path, CIFAR, max_samples=6, seed=1)
    b = ImageFolderData(tmp_path, CIFAR, max_samples=6, seed=1)
    c = ImageFolderData(tmp_path, CIFAR, max_samples=6, seed=2)
    assert len(a) == 6 and a.paths == b.paths and a.labels == b.labels and a.paths != c.paths
    assert set(a.paths) <= set(ds.paths)
    assert len(ImageFolderData(tmp_path, CIFAR, max_samples=100)) == 20


def test_flat_folder_and_resize(tmp_path):
    _write_images(tmp_path, 3, size=(60, 40), ext="jpeg")
    ds = ImageFolderData(tmp_path, IMAGENET)
    assert ds.classes == [] and ds.labels == [-1, -1, -1]
    x, label, index = ds[2]
    assert x.shape == (3, 224, 224) and label == -1 and index == 2


def test_normalisation():
    x = image_transform(CIFAR)(Image.new("RGB", (32, 32), (255, 0, 128)))
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x[:, 0, 0], torch.tensor(expected), atol=1e-5)


def test_corrupt_and_truncated_images(tmp_path):
    _write_images(tmp_path, 1, ext="jpg")
    good = tmp_path / "000.jpg"
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    ds = ImageFolderData(tmp_path, CIFAR)
    assert ds[ds.paths.index(good)][0].shape == (3, 32, 32)
    for name in ("bad.jpg", "cut.jpg"):
        with pytest.raises(CorruptImageError, match=name) as err:
            ds[ds.paths.index(tmp_path / name)]
        assert str(tmp_path / name) in str(err.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderData(tmp_path / "nope", CIFAR)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    (tmp_path / "empty" / "sub").mkdir()
    with pytest.raises(ValueError, match=r"empty.*\.jpg.*\.webp"):
        ImageFolderData(tmp_path / "empty", CIFAR)


@pytest.mark.needs_shared
@pytest.mark.skipif(not SHARED_TRAFFIC.is_dir(), reason=f"shared CIFAR-10 test folder absent at {SHARED_TRAFFIC}")
def test_default_traffic_is_shared_and_sample_is_representative():
    assert default_traffic_dir() == SHARED_TRAFFIC
    ds = ImageFolderData(SHARED_TRAFFIC, CIFAR, max_samples=500, seed=0)
    counts = np.bincount(ds.labels, minlength=10)
    assert len(ds.classes) == 10 and counts.min() >= 30


def test_default_traffic_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFXIT_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("SELFXIT_CACHE", str(tmp_path / "cache"))

    def offline(root):
        raise RuntimeError("network unreachable (test)")

    monkeypatch.setattr(data, "_load_cifar10_test", offline)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as err:
        default_traffic_dir()
    assert str(tmp_path / "cache" / "torchvision") in str(err.value) and "SELFXIT_SHARED" in str(err.value)

    calls = []

    def fake(root):
        calls.append(root)
        images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
        return images, [0, 1, 0, 2, 1, 0], ["airplane", "automobile", "bird"]

    monkeypatch.setattr(data, "_load_cifar10_test", fake)
    folder = default_traffic_dir()
    assert folder == tmp_path / "cache" / "cifar10-test" and default_traffic_dir() == folder and len(calls) == 1
    ds = ImageFolderData(folder, CIFAR)
    assert ds.classes == ["airplane", "automobile", "bird"] and ds.labels == [0, 0, 0, 1, 1, 2]
    assert ds.paths[0].name == "0000.png" and ds[5][0].shape == (3, 32, 32)
