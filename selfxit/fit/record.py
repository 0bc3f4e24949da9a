"""Record the medial dataset: activations at candidate layers (forward hooks) and the backbone's softmax."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from selfxit.zoo.data import split_indices
from selfxit.core.hooks import capture, split_batch
from selfxit.fit.medial import SPLITS, MedialDataset, MedialWriter

TUNE_FRACTION = 0.2  # share of the train split held out from head training for calibration and threshold design


def assign_splits(num_samples: int, seed: int) -> np.ndarray:
    """Split code per traffic sample: the seeded 50/20/30 train/val/test split, with 20% of train kept as 'tune'."""
    parts = split_indices(num_samples, seed)
    split = np.empty(num_samples, dtype=np.uint8)
    for name, rows in parts.items():
        split[rows] = SPLITS[name]
    train = np.sort(parts["train"])
    tune = np.random.default_rng(seed + 1).permutation(train)[: int(round(len(train) * TUNE_FRACTION))]
    split[tune] = SPLITS["tune"]
    return split


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Label-free image augmentation for distillation data: random horizontal flip and translation."""
    if x.ndim != 4:
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect")
    h, w = x.shape[2:]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def record(backbone: nn.Module, layers: list[str], shapes: list[tuple[int, ...]], num_classes: int, loader,
           num_samples: int, out_dir: str | Path, seed: int = 0, augment_copies: int = 2,
           progress: bool = True) -> MedialDataset:
    """Run the frozen backbone over ``loader`` (``num_samples`` samples in a fixed order) and write the medial dataset.

    Train-split samples are also recorded ``augment_copies`` more times under random flips/shifts: the
    backbone labels them itself, so this adds distillation data without labels.
    """
    if backbone.training:
        raise RuntimeError("the backbone must be in eval mode while recording (BatchNorm statistics would move)")
    split = assign_splits(num_samples, seed)
    n_train = int((split == SPLITS["train"]).sum())
    writer = MedialWriter(out_dir, layers, shapes, num_samples + augment_copies * n_train, num_classes, seed)
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    with capture(backbone, layers) as store, tqdm(total=num_samples, desc="collect", unit="img",
                                                             disable=not progress) as bar:
        for batch in loader:
            x, labels = split_batch(batch)
            rows = np.arange(seen, seen + len(x))
            if rows[-1] >= num_samples:
                raise ValueError(f"traffic has more than the {num_samples} samples announced")
            labels_np = labels.numpy() if labels is not None else np.full(len(x), -1)
            probs = backbone(x).softmax(dim=1)
            writer.append([store[name] for name in layers], probs, split[rows], rows, labels_np)
            train = split[rows] == SPLITS["train"]
            for _ in range(augment_copies if train.any() else 0):
                probs = backbone(augment(x[train], generator)).softmax(dim=1)
                writer.append([store[name] for name in layers], probs, split[rows][train], rows[train],
                              labels_np[train])
            seen += len(x)
            bar.update(len(x))
    if seen != num_samples:
        raise ValueError(f"traffic ended after {seen} of {num_samples} samples")
    return writer.close()
