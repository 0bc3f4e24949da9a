"""Backbones by name: shared CIFAR weights and accuracy, weight-file errors, torchvision models."""
import shutil
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from selfxit import zoo
from selfxit.settings import shared_dir
from selfxit.zoo import CheckpointError, ChecksumError, load_backbone
from selfxit.zoo.data import ImageFolderData

SHARED = shared_dir()
_skip_without_shared = pytest.mark.skipif(
    not (SHARED / "models").is_dir() or not (SHARED / "data" / "cifar10-test").is_dir(),
    reason=f"shared material absent at {SHARED} (set SELFXIT_SHARED)")


def needs_shared(test):
    """Skip without the shared models and images; marked ``needs_shared`` so that skip fails a run that has them."""
    return pytest.mark.needs_shared(_skip_without_shared(test))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty shared and cache folders, and a download that fails as if offline."""
    monkeypatch.setenv("SELFXIT_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("SELFXIT_CACHE", str(tmp_path / "cache"))

    def offline(url, dest):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(zoo, "_download", offline)
    return tmp_path


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet56"])
def test_shared_weights_accuracy(name):
    model, info = load_backbone(name)
    assert info == zoo.ModelInfo(name, (3, 32, 32), None, zoo.IMAGENET_MEAN, zoo.IMAGENET_STD, 10)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ds = ImageFolderData(SHARED / "data" / "cifar10-test", info, max_samples=500, seed=0)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and len(ds) == 500
    correct = 0
    with torch.no_grad():
        for x, y, _ in torch.utils.data.DataLoader(ds, batch_size=250):
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(ds) > 0.75


@needs_shared
def test_explicit_weights_path_matches_default():
    default, _ = load_backbone("cifar_resnet20")
    explicit, _ = load_backbone("cifar_resnet20", weights=SHARED / "models" / "resnet20-12fca82f.th")
    for a, b in zip(default.state_dict().values(), explicit.state_dict().values()):
        assert torch.equal(a, b)


def test_sha_mismatch(isolated):
    bad = isolated / "shared" / "models" / "resnet20-12fca82f.th"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the published weights")
    with pytest.raises(ChecksumError, match="12fca82f") as err:
        load_backbone("cifar_resnet20")
    assert str(bad) in str(err.value)


def test_missing_weights_offline(isolated):
    with pytest.raises(FileNotFoundError) as err:
        load_backbone("cifar_resnet56")
    msg = str(err.value)
    for part in ("resnet56-4bfd9763.th", zoo.WEIGHTS_URL.format("resnet56-4bfd9763.th"),
                 str(isolated / "cache" / "models"), "SELFXIT_SHARED"):
        assert part in msg
    assert not list((isolated / "cache" / "models").iterdir())  # no partial file left behind


def test_download_bad_checksum_saves_nothing(isolated, monkeypatch):
    monkeypatch.setattr(zoo, "_download", lambda url, dest: Path(dest).write_bytes(b"html error page"))
    with pytest.raises(ChecksumError, match="12fca82f"):
        load_backbone("cifar_resnet20")
    assert not list((isolated / "cache" / "models").iterdir())


@needs_shared
def test_download_to_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFXIT_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("SELFXIT_CACHE", str(tmp_path / "cache"))
    urls = []

    def fake_download(url, dest):
        urls.append(url)
        shutil.copyfile(SHARED / "models" / url.rsplit("/", 1)[-1], dest)

    monkeypatch.setattr(zoo, "_download", fake_download)
    load_backbone("cifar_resnet20")
    load_backbone("cifar_resnet20")
    assert urls == [zoo.WEIGHTS_URL.format("resnet20-12fca82f.th")]
    assert (tmp_path / "cache" / "models" / "resnet20-12fca82f.th").is_file()


def test_checkpoint_formats_and_errors(tmp_path):
    source = zoo.cifar_resnet("cifar_resnet20")
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    model, _ = load_backbone("cifar_resnet20", weights=wrapped)
    assert torch.equal(model.linear.weight, source.linear.weight)

    with pytest.raises(CheckpointError, match="missing keys: layer1.3") as err:
        load_backbone("cifar_resnet32", weights=wrapped)
    assert str(wrapped) in str(err.value)

    with pytest.raises(CheckpointError, match=r"shape mismatches.*fc.weight") as err:
        load_backbone("resnet18", weights=_save(tmp_path / "r18.pt", _resnet18_state(num_classes=10)))
    assert "r18.pt" in str(err.value)

    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="garbage.th"):
        load_backbone("cifar_resnet20", weights=garbage)
    with pytest.raises(FileNotFoundError, match="nowhere.th"):
        load_backbone("cifar_resnet20", weights=tmp_path / "nowhere.th")


def _resnet18_state(num_classes):
    import torchvision
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_untrained_cifar_warns():
    with pytest.warns(UserWarning, match="untrained"):
        model, info = load_backbone("cifar_resnet32")
    assert model(torch.zeros(2, *info.input_size)).shape == (2, 10)


@pytest.mark.parametrize("name,resize", [("resnet18", 256), ("mobilenet_v3_large", 232)])
def test_torchvision_random_init(name, resize, torch_hub):
    with pytest.warns(UserWarning, match="untrained"):
        model, info = load_backbone(name, random_init=True)
    assert info.input_size == (3, 224, 224) and info.resize == resize and info.num_classes == 1000
    assert info.mean == zoo.IMAGENET_MEAN and info.std == zoo.IMAGENET_STD
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(1, *info.input_size)).shape == (1, 1000)


def test_unknown_name_and_listing():
    names = zoo.available_models()
    assert {"cifar_resnet20", "cifar_resnet110", "resnet18", "vit_b_16"} <= set(names)
    with pytest.raises(ValueError, match="resnet18"):
        load_backbone("resnet19")


def test_trained_load_does_not_warn(tmp_path):
    path = _save(tmp_path / "c44.pt", zoo.cifar_resnet("cifar_resnet44").state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone("cifar_resnet44", weights=path)


# ---- torchvision's pretrained weights, through torchvision's download and cache (never the network) ----

@pytest.fixture
def torch_hub(tmp_path, monkeypatch):
    """An empty torchvision cache ($TORCH_HOME) and a torch.hub download that fails as if offline; the
    URLs it was asked for are in the returned list."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked = []

    def offline(url, dst, hash_prefix=None, progress=True):
        asked.append(url)
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return asked


def _resnet18_file(path):
    torch.manual_seed(3)
    return _save(path, _resnet18_state(num_classes=1000))


def test_torchvision_pretrained_from_cache(torch_hub):
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    _resnet18_file(cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pretrained: no "untrained" warning
        model, info = load_backbone("resnet18")
    assert torch.equal(model.fc.weight, torch.load(cached, weights_only=True)["fc.weight"])
    assert info.input_size == (3, 224, 224) and info.num_classes == 1000
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch_hub == []  # found in torchvision's cache: nothing downloaded


def test_torchvision_pretrained_download_once(torch_hub, tmp_path, monkeypatch):
    source = _resnet18_file(tmp_path / "published.pth")
    urls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        urls.append((url, hash_prefix))
        shutil.copyfile(source, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    load_backbone("resnet18")
    model, _ = load_backbone("resnet18")
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    assert urls == [(url, "f37072fd")]  # once, with the hash in the file name to check
    assert (Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth").is_file()
    assert torch.equal(model.conv1.weight, torch.load(source, weights_only=True)["conv1.weight"])


def test_torchvision_pretrained_corrupt_download(torch_hub, monkeypatch):
    def bad_hash(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", bad_hash)
    with pytest.raises(ChecksumError, match="resnet18-f37072fd.pth.*invalid hash"):
        load_backbone("resnet18")
    assert not (Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_torchvision_pretrained_offline_error(torch_hub):
    with pytest.raises(FileNotFoundError) as err:
        load_backbone("resnet50")
    url = torchvision.models.ResNet50_Weights.DEFAULT.url
    message = str(err.value)
    for part in (url.rsplit("/", 1)[-1], url, str(Path(torch.hub.get_dir()) / "checkpoints"), "TORCH_HOME",
                 "--weights", "--random-init"):
        assert part in message
    assert torch_hub == [url]


def test_torchvision_weights_file_overrides_and_random_init(torch_hub, tmp_path):
    path = _resnet18_file(tmp_path / "mine.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load_backbone("resnet18", weights=path)
    assert torch.equal(model.fc.bias, torch.load(path, weights_only=True)["fc.bias"])
    with pytest.raises(ValueError, match="not both"):
        load_backbone("resnet18", weights=path, random_init=True)
    assert torch_hub == []


def test_random_init_flag(torch_hub):
    import argparse

    from selfxit.cli.common import add_model_args
    from selfxit.cli.common import load_backbone as cli_load

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model", "resnet18", "--random-init"])
    with pytest.warns(UserWarning, match="untrained, as asked"):
        model, _ = cli_load(args)
    assert torch_hub == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "resnet18", "--random-init", "--weights", "w.pth"])
