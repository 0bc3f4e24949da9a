"""Frozen backbones by name: the CIFAR ResNets with their published weights, and torchvision classifiers with
theirs (torchvision's default pretrained weights, through torchvision's download and cache)."""
from __future__ import annotations

import difflib
import hashlib
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from selfxit.settings import cache_dir, shared_dir
from selfxit.zoo.cifar_resnet import DEPTHS, cifar_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Published CIFAR-10 weights (akamaster/pytorch_resnet_cifar10, BSD-2-Clause); the name carries a SHA-256 prefix.
CIFAR_WEIGHT_FILES = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}
WEIGHTS_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{}"


class ChecksumError(ValueError):
    """A weights file whose SHA-256 does not start with the hash in its name."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class ModelInfo:
    """What a backbone expects: input shape (C, H, W), preprocessing and number of classes."""

    name: str
    input_size: tuple[int, int, int]
    resize: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int


def _torchvision_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """All names ``load_backbone`` accepts: the CIFAR ResNets, then torchvision's classifiers."""
    return sorted(DEPTHS) + _torchvision_models()


def load_backbone(name: str, weights: str | Path | None = None,
                  random_init: bool = False) -> tuple[nn.Module, ModelInfo]:
    """Build backbone ``name`` in eval mode with frozen parameters, and describe its input.

    ``weights`` is a checkpoint file (a state_dict, or a dict holding one under ``state_dict`` or
    ``model``; a ``module.`` prefix is stripped). Without it, ``cifar_resnet20``/``cifar_resnet56``
    get their published CIFAR-10 weights (shared folder, else a verified download), torchvision
    classifiers their default pretrained weights through torchvision's own download and cache
    (:func:`pretrained_torchvision_weights`), and the other CIFAR ResNets are randomly initialised,
    with a warning. ``random_init=True`` asks for an untrained network (with the same warning).
    """
    if weights is not None and random_init:
        raise ValueError("pass either a weights file or random_init=True, not both")
    pretrained = weights is None and not random_init
    model: nn.Module
    if name in DEPTHS:
        model = cifar_resnet(name)
        info = ModelInfo(name, (3, 32, 32), None, IMAGENET_MEAN, IMAGENET_STD, 10)
        if pretrained and name in CIFAR_WEIGHT_FILES:
            weights = pretrained_cifar_weights(name)
    elif name in _torchvision_models():
        preset = torchvision.models.get_model_weights(name).DEFAULT
        if pretrained:
            model = _pretrained_torchvision(name, preset)
        else:
            model = torchvision.models.get_model(name, weights=None)
        tf = preset.transforms()
        crop = tf.crop_size[0]
        info = ModelInfo(name, (3, crop, crop), tf.resize_size[0], tuple(tf.mean), tuple(tf.std),
                         len(preset.meta["categories"]))
    else:
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see selfxit.zoo.available_models()"
        raise ValueError(f"unknown model {name!r}{hint}")

    if weights is not None:
        load_checkpoint(model, weights)
    elif random_init:
        warnings.warn(f"{name} is randomly initialised and untrained, as asked (random_init)", stacklevel=2)
    elif name not in _torchvision_models():
        warnings.warn(f"{name} has no weights: it is randomly initialised and untrained "
                      "(pass a checkpoint file as weights to use a trained model)", stacklevel=2)
    return model.eval().requires_grad_(False), info


def pretrained_torchvision_weights(name: str) -> Path:
    """Path of torchvision's default pretrained weights for ``name`` in torchvision's cache
    (``torch.hub.get_dir()/checkpoints``, under ``$TORCH_HOME``), downloaded there once by torch.hub with the
    hash in the file name checked. Offline, a FileNotFoundError names the file, the URL and where to put it.
    """
    preset = torchvision.models.get_model_weights(name).DEFAULT
    url = preset.url
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(cached.name)
    try:
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=True)
    except RuntimeError as e:  # torch.hub's hash check
        cached.unlink(missing_ok=True)
        raise ChecksumError(f"downloaded {url} but it is corrupt or not the published file ({e}); nothing was "
                            f"saved to {cached}") from e
    except Exception as e:
        cached.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"pretrained weights for {name} not found: {cached.name} is not in torchvision's cache {cache}, and "
            f"downloading {url} failed ({e}). Download {url} and save it as {cached} (set TORCH_HOME to move the "
            f"cache), or pass a checkpoint file (--weights PATH, weights=PATH), or ask for an untrained network "
            f"(--random-init, random_init=True).") from e
    return cached


def _pretrained_torchvision(name: str, preset) -> nn.Module:
    """``name`` built by torchvision with its default weights, from the file :func:`pretrained_torchvision_weights`
    puts in torchvision's cache (so torchvision's own loading finds it there and never downloads)."""
    cached = pretrained_torchvision_weights(name)
    try:
        return torchvision.models.get_model(name, weights=preset)
    except Exception as e:
        raise CheckpointError(f"torchvision could not load its pretrained weights for {name} from {cached} ({e}); "
                              "delete that file to download it again") from e


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load checkpoint ``path`` into ``model`` strictly, with errors naming the file and offending keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise CheckpointError(f"checkpoint {path} holds no state_dict (expected a dict of tensors, "
                              "or a dict with one under 'state_dict' or 'model')")
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}

    expected = model.state_dict()
    problems = []
    # Older checkpoints lack BatchNorm's num_batches_tracked; load_state_dict fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs model)", wrong_shape)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _name_hash(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1].lower()


def sha256_prefix_ok(path: Path, expected: str | None = None) -> bool:
    """Whether the SHA-256 of ``path`` starts with ``expected`` (default: the hash after the last ``-`` of its stem)."""
    expected = (expected or _name_hash(path)).lower()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(expected)


def _verify(path: Path, expected: str | None = None) -> Path:
    expected = expected or _name_hash(path)
    if not sha256_prefix_ok(path, expected):
        raise ChecksumError(f"weights file {path} is corrupt or not the published file: its SHA-256 "
                            f"does not start with {expected!r} (the hash in its name)")
    return path


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` (replaced in tests to simulate being offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def pretrained_cifar_weights(name: str) -> Path:
    """Path of the verified published weights for ``name``: from the shared folder, else downloaded once to the cache."""
    filename = CIFAR_WEIGHT_FILES[name]
    prefix = filename.split("-")[0] + "-"
    shared = sorted((shared_dir() / "models").glob(f"{prefix}*.th"))
    if shared:
        return _verify(shared[0])

    cached = cache_dir() / "models" / filename
    if cached.is_file():
        return _verify(cached)
    url = WEIGHTS_URL.format(filename)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".part")
    try:
        _download(url, partial)
    except Exception as e:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"pretrained weights for {name} not found: no {prefix}*.th in {shared_dir() / 'models'}, "
            f"and downloading them failed ({e}). Download {url} and save it as {cached}, "
            f"or set SELFXIT_SHARED to a folder whose models/ holds {filename}.") from e
    try:
        _verify(partial, _name_hash(cached))
    except ChecksumError as e:
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"downloaded {url} but it is corrupt or not the published file: its SHA-256 "
                            f"does not start with {_name_hash(cached)!r}; nothing was saved to {cached}") from e
    return partial.replace(cached)
