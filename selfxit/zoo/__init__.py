"""Frozen backbones by name: the CIFAR ResNets with their published weights, and torchvision classifiers."""
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

from selfxit.zoo.cifar_resnet import DEPTHS, cifar_resnet
from selfxit.settings import cache_dir, shared_dir

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


def load_backbone(name: str, weights: str | Path | None = None) -> tuple[nn.Module, ModelInfo]:
    """Build backbone ``name`` in eval mode with frozen parameters, and describe its input.

    ``weights`` is a checkpoint file (a state_dict, or a dict holding one under ``state_dict`` or
    ``model``; a ``module.`` prefix is stripped). Without it, ``cifar_resnet20``/``cifar_resnet56``
    get their published CIFAR-10 weights (shared folder, else a verified download); every other
    model is randomly initialised, with a warning.
    """
    if name in DEPTHS:
        model = cifar_resnet(name)
        info = ModelInfo(name, (3, 32, 32), None, IMAGENET_MEAN, IMAGENET_STD, 10)
        if weights is None and name in CIFAR_WEIGHT_FILES:
            weights = pretrained_cifar_weights(name)
    elif name in _torchvision_models():
        model = torchvision.models.get_model(name, weights=None)
        preset = torchvision.models.get_model_weights(name).DEFAULT
        tf = preset.transforms()
        crop = tf.crop_size[0]
        info = ModelInfo(name, (3, crop, crop), tf.resize_size[0], tuple(tf.mean), tuple(tf.std),
                         len(preset.meta["categories"]))
    else:
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see selfxit.zoo.available_models()"
        raise ValueError(f"unknown model {name!r}{hint}")

    if weights is None:
        warnings.warn(f"{name} has no weights: it is randomly initialised and untrained "
                      "(pass a checkpoint file as weights to use a trained model)", stacklevel=2)
    else:
        load_checkpoint(model, weights)
    return model.eval().requires_grad_(False), info


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
