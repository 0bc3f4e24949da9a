"""The medial dataset: activations at candidate layers plus the backbone's softmax, on disk.

Layout of a medial folder::

    meta.json              candidates, shapes, sample count, classes, split sizes
    act_<i>.npy            [N, *shape] activations of candidate i (memory-mapped float16)
    probs.npy              [N, classes] backbone softmax (float32)
    split.npy              [N] 0 train, 1 tune, 2 val, 3 test (see SPLITS)
    source.npy             [N] index of the traffic sample it came from
    labels.npy             [N] folder label when known (-1 otherwise); reporting only

Memory stays bounded: rows are written batch by batch into memory-maps and read back the same way.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = {"train": 0, "tune": 1, "val": 2, "test": 3}
FORMAT_VERSION = 1


@dataclass
class MedialMeta:
    """What a medial folder holds."""

    candidates: list[str]
    shapes: list[tuple[int, ...]]
    num_samples: int
    num_classes: int
    seed: int
    format_version: int = FORMAT_VERSION


class MedialWriter:
    """Writes rows into a medial folder whose final size is known up front."""

    def __init__(self, root: str | Path, candidates: list[str], shapes: list[tuple[int, ...]], num_samples: int,
                 num_classes: int, seed: int):
        self.root = Path(root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.meta = MedialMeta(list(candidates), [tuple(s) for s in shapes], num_samples, num_classes, seed)
        self._acts = [self._map(f"act_{i}", np.float16, (num_samples, *s)) for i, s in enumerate(shapes)]
        self._probs = self._map("probs", np.float32, (num_samples, num_classes))
        self._split = self._map("split", np.uint8, (num_samples,))
        self._source = self._map("source", np.int64, (num_samples,))
        self._labels = self._map("labels", np.int64, (num_samples,))
        self.filled = 0

    def _map(self, name, dtype, shape):
        return np.lib.format.open_memmap(self.root / (name + ".npy"), mode="w+", dtype=dtype, shape=shape)

    def append(self, activations: list[torch.Tensor], probs: torch.Tensor, split: np.ndarray,
               source: np.ndarray, labels: np.ndarray) -> None:
        """Write one batch of rows."""
        rows = slice(self.filled, self.filled + len(probs))
        if rows.stop > self.meta.num_samples:
            raise ValueError(f"medial dataset is sized for {self.meta.num_samples} rows; got more")
        for store, act in zip(self._acts, activations):
            store[rows] = act.detach().to(torch.float16).cpu().numpy()
        self._probs[rows] = probs.detach().float().cpu().numpy()
        self._split[rows], self._source[rows], self._labels[rows] = split, source, labels
        self.filled = rows.stop

    def close(self) -> "MedialDataset":
        """Flush to disk and reopen read-only."""
        if self.filled != self.meta.num_samples:
            raise RuntimeError(f"medial dataset got {self.filled} of {self.meta.num_samples} rows")
        for m in [*self._acts, self._probs, self._split, self._source, self._labels]:
            m.flush()
        meta = {**self.meta.__dict__, "shapes": [list(s) for s in self.meta.shapes]}
        (self.root / "meta.json").write_text(json.dumps(meta, indent=1))
        return MedialDataset(self.root)


class MedialDataset:
    """Read-only view of a medial folder; arrays are memory-mapped, nothing is loaded eagerly."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{self.root} is not a medial dataset (no meta.json); run collect first")
        raw = json.loads(meta_file.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.root}: medial format {raw.get('format_version')} != {FORMAT_VERSION}")
        raw["shapes"] = [tuple(s) for s in raw["shapes"]]
        self.meta = MedialMeta(**raw)
        self.probs = self._load("probs")
        self.split = self._load("split")
        self.source = self._load("source")
        self.labels = self._load("labels")

    def _load(self, name):
        return np.load(self.root / (name + ".npy"), mmap_mode="r")

    @property
    def candidates(self) -> list[str]:
        return self.meta.candidates

    def activations(self, candidate: str | int) -> np.ndarray:
        """Memory-mapped [N, *shape] float16 activations of one candidate."""
        i = candidate if isinstance(candidate, int) else self.meta.candidates.index(candidate)
        return self._load(f"act_{i}")

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split ('train', 'tune', 'val' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS[split])

    def teacher(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """Backbone softmax for the given rows (all rows when None)."""
        probs = self.probs if rows is None else self.probs[rows]
        return torch.from_numpy(np.array(probs, dtype=np.float32, copy=True))

    def batches(self, candidate: str | int, rows: np.ndarray, batch_size: int = 512):
        """Yield (activations float32, teacher probs, rows) for the rows in order, batch by batch."""
        acts = self.activations(candidate)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(acts[chunk])).float()
            yield x, torch.from_numpy(np.ascontiguousarray(self.probs[chunk])), chunk
