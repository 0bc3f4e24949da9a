"""Image folders as datasets, seeded splits, and the default traffic (the CIFAR-10 test images)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from selfxit.settings import cache_dir, shared_dir
from selfxit.zoo import ModelInfo
from selfxit.zoo.images import CorruptImageError, open_rgb  # noqa: F401 (CorruptImageError: re-exported)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR10_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def image_transform(info: ModelInfo) -> Callable:
    """PIL image -> normalised float tensor of shape ``info.input_size``.

    With ``info.resize`` the shorter side is resized to it and the centre cropped; otherwise the image
    is used as is (only resized if it is not already H x W).
    """
    _, h, w = info.input_size
    geometry = ([transforms.Resize(info.resize), transforms.CenterCrop((h, w))] if info.resize
                else [transforms.Resize((h, w))])
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderData(torch.utils.data.Dataset):
    """Images under root in ImageFolder layout (class subfolders) OR a flat folder of images (labels -1).

    Class index = alphabetical order of the subfolders. ``__getitem__`` returns (tensor, label:int, index:int).
    ``max_samples`` keeps a seeded random subset (in file order), deterministic for a given seed.
    """

    def __init__(self, root: str | Path, info: ModelInfo, max_samples: int | None = None, seed: int = 0):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [_images_in(d, recursive=True) for d in subdirs]
        if any(per_class):
            self.classes = [d.name for d in subdirs]
            pairs = [(p, label) for label, files in enumerate(per_class) for p in files]
        else:
            self.classes = []
            pairs = [(p, -1) for p in _images_in(self.root, recursive=False)]
        if not pairs:
            raise ValueError(f"no images in {self.root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}; "
                             "expected class subfolders or a flat folder of images)")
        if max_samples is not None:
            if max_samples < 1:
                raise ValueError(f"max_samples must be positive, got {max_samples}")
            if max_samples < len(pairs):
                keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_samples, replace=False))
                pairs = [pairs[i] for i in keep]
        self.paths: list[Path] = [p for p, _ in pairs]
        self.labels: list[int] = [label for _, label in pairs]
        self.info = info
        self.transform = image_transform(info)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(open_rgb(self.paths[index])), self.labels[index], index


def split_indices(n: int, seed: int, fractions=(0.5, 0.2, 0.3)) -> dict[str, np.ndarray]:
    """Seeded disjoint 'train'/'val'/'test' index arrays (each sorted) covering ``range(n)``."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = min(n, round(fractions[0] * n))
    n_val = min(n - n_train, round(fractions[1] * n))
    parts = np.split(perm, [n_train, n_train + n_val])
    return {k: np.sort(p) for k, p in zip(("train", "val", "test"), parts)}


def _load_cifar10_test(root: Path) -> tuple[np.ndarray, list[int], list[str]]:
    """CIFAR-10 test split via torchvision (downloads into ``root`` unless the archive is there)."""
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root=str(root), train=False, download=True)
    return ds.data, list(ds.targets), list(ds.classes)


def default_traffic_dir() -> Path:
    """The CIFAR-10 test images in ImageFolder layout: the shared folder, else PNGs materialised once in the cache."""
    shared = shared_dir() / "data" / "cifar10-test"
    if shared.is_dir():
        return shared
    target = cache_dir() / "cifar10-test"
    done = target / ".complete"
    if done.is_file():
        return target
    download_root = cache_dir() / "torchvision"
    try:
        images, labels, classes = _load_cifar10_test(download_root)
    except Exception as e:
        raise FileNotFoundError(
            f"CIFAR-10 test images not found: {shared} does not exist and fetching CIFAR-10 failed ({e}). "
            f"Download {CIFAR10_ARCHIVE_URL} into {download_root}/ (it is converted to {target} on next use), "
            "or set SELFXIT_SHARED to a folder holding data/cifar10-test/<class>/*.jpg.") from e
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = [0] * len(classes)
    for img, label in zip(images, labels):
        folder = tmp / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{counts[label]:04d}.png")
        counts[label] += 1
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
