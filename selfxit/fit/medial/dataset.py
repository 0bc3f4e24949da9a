"""Reading a medial dataset: :class:`MedialDataset`, a read-only view that holds only the per-row index
(layout: :mod:`selfxit.fit.medial.store`)."""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import cast

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

import selfxit.fit.medial.shards as shard_format
from selfxit.core.heads import can_feed, describe_reduction, input_reduction, stored_stage
from selfxit.fit.medial.store import (
    FORMAT_VERSION,
    MANIFEST,
    RECORDING,
    SPLITS,
    MedialIncompleteWarning,
    MedialMeta,
    MedialShardError,
    MedialStoreError,
    fs_of,
    listing,
    read_indices,
    read_json,
)

OPEN_FILES = 16  # shard files a reader keeps open


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class MedialDataset:
    """Read-only view of a medial dataset (folder or URL). Only the per-row index is held in memory; rows are
    read from the shards on demand, each checked against its checksum.

    ``on_bad_shard``: 'raise' (default) refuses a dataset with missing or damaged shards, naming them;
    'skip' reads the other shards and warns how many rows were lost.
    """

    def __init__(self, root: str | Path, *, on_bad_shard: str = "raise"):
        if on_bad_shard not in ("raise", "skip"):
            raise ValueError(f"on_bad_shard must be 'raise' or 'skip'; got {on_bad_shard!r}")
        self.fs, self._path, self.location = fs_of(root)
        local = isinstance(self.fs, LocalFileSystem)
        self.root: Path | str = Path(self._path) if local else self.location  # a Path for local folders
        self.location = str(self.root)  # absolute folder, or the URL
        manifest = read_json(self.fs, f"{self._path}/{MANIFEST}")
        recording = None if manifest is not None else read_json(self.fs, f"{self._path}/{RECORDING}")
        if manifest is None and recording is None:
            if self.fs.exists(f"{self._path}/meta.json"):
                raise MedialStoreError(f"{self.location} is a medial dataset of format 1 (full activation maps, "
                                       f"written by an older selfxit); collect it again")
            raise FileNotFoundError(f"{self.location} is not a medial dataset (no {MANIFEST}); run collect first")
        raw: dict = manifest["meta"] if manifest is not None else cast(dict, recording)
        if raw.get("format_version") != FORMAT_VERSION:
            raise MedialStoreError(f"{self.location}: medial format {raw.get('format_version')} != {FORMAT_VERSION}; "
                                   "collect it again")
        meta = MedialMeta.from_json(raw)
        sizes = listing(self.fs, self._path)
        problems: dict[str, str] = {}
        if manifest is not None:
            names = [s["file"] for s in manifest["shards"]]
            for s in manifest["shards"]:
                if s["file"] not in sizes:
                    problems[s["file"]] = "is missing"
                elif sizes[s["file"]] != s["bytes"]:
                    problems[s["file"]] = f"has {sizes[s['file']]:,} bytes where the manifest says {s['bytes']:,}"
            listed = {s["file"]: s["rows"] for s in manifest["shards"]}
            names = [n for n in names if n not in problems]
        else:
            names, listed = sorted(sizes), {}
        indices, bad = read_indices(self.fs, self._path, names, sizes)
        problems.update(bad)
        expected = meta.expected_rows if meta.expected_rows is not None else meta.num_samples
        present = sum(i.rows for i in indices)
        if problems:
            lost = sum(listed.get(n, 0) for n in problems) or max(expected - present, 0)
            message = (f"medial dataset {self.location}: " + "; ".join(f"shard {n} {why}" for n, why in
                                                                     sorted(problems.items()))
                       + f" ({lost:,} rows). Restore the shard files, or collect again; "
                       f"MedialDataset(..., on_bad_shard='skip') reads the {len(indices)} intact shards")
            if on_bad_shard == "raise":
                raise MedialShardError(message)
            warnings.warn(message, MedialIncompleteWarning, stacklevel=2)
        self.shards = indices
        self.lost_rows = max(expected - present, 0)
        self.complete = manifest is not None and not problems
        if manifest is None and self.lost_rows:
            warnings.warn(f"medial dataset {self.location} is incomplete (its recording did not finish: a recorder "
                          f"was stopped or a rank died): its {len(indices)} complete shards hold {present:,} of "
                          f"{expected:,} rows, {self.lost_rows:,} rows lost. They read back; collect again to "
                          "record the rest", MedialIncompleteWarning, stacklevel=2)
        meta.num_samples = present
        self.meta = meta
        self._starts = np.cumsum([0] + [i.rows for i in indices])
        self.split = _concat([i.split for i in indices], np.uint8)
        self.source = _concat([i.source for i in indices], np.int64)
        self.labels = _concat([i.labels for i in indices], np.int64)
        self._files: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # ---- what is stored ----------------------------------------------------------------------------------
    @property
    def candidates(self) -> list[str]:
        return self.meta.candidates

    def _index(self, candidate: str | int) -> int:
        if isinstance(candidate, (int, np.integer)):
            return int(candidate)
        if candidate not in self.meta.candidates:
            raise ValueError(f"{candidate!r} is not a candidate of this medial dataset; it has {self.meta.candidates}")
        return self.meta.candidates.index(candidate)

    def reduction(self, candidate: str | int) -> dict:
        """The reduction stored for ``candidate`` (see :mod:`selfxit.core.heads`)."""
        return self.meta.reductions[self._index(candidate)]

    @property
    def stored_bytes(self) -> dict[str, int]:
        """Stored activation bytes per row, per candidate."""
        return self.meta.bytes_per_row

    def input_stage(self, candidate: str | int, head: nn.Module) -> nn.Module:
        """The part of ``head`` (a head for the candidate's full activation) to apply to the stored rows."""
        i = self._index(candidate)
        try:
            return stored_stage(head, self.meta.shapes[i], self.meta.reductions[i])
        except ValueError as exc:
            raise ValueError(f"head at {self.meta.candidates[i]!r}: {exc}") from None

    def check_heads(self, specs: dict[str, dict]) -> None:
        """ValueError naming every candidate whose head spec consumes finer features than were stored (and what to
        collect instead), before any training."""
        problems = []
        for name, spec in specs.items():
            i = self._index(name)
            shape, stored = self.meta.shapes[i], self.meta.reductions[i]
            needed = input_reduction(spec, shape)
            if not can_feed(shape, stored, needed):
                problems.append(f"{name!r} needs the {describe_reduction(shape, needed)} but the dataset stored the "
                                f"{describe_reduction(shape, stored)}")
        if problems:
            raise ValueError("the medial dataset cannot train these heads: " + "; ".join(problems)
                             + ". Collect again with collect(heads=<the same specs>) (or heads='full', budget "
                             "permitting), or use heads whose input was stored")

    # ---- reading rows ----------------------------------------------------------------------------------------
    def _file(self, s: int):
        with self._lock:
            f = self._files.pop(s, None)
            if f is None:
                f = self.fs.open(self.shards[s].path, "rb")
                if len(self._files) >= OPEN_FILES:
                    _, old = self._files.popitem(last=False)
                    old.close()
            self._files[s] = f
            return f

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of array ``name`` ('probs' or 'act_<i>') in the order given (stored dtype)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.meta.num_samples):
            raise IndexError(f"rows out of range: the medial dataset has {self.meta.num_samples} rows")
        shape: tuple[int, ...]
        if name == "probs":
            dtype, shape = np.dtype(np.float32), (self.meta.num_classes,)
        else:
            dtype, shape = np.dtype(self.meta.dtype), tuple(self.meta.stored_shapes[int(name.split("_")[1])])
        unique, inverse = np.unique(rows, return_inverse=True)
        data = np.empty((len(unique), *shape), dtype=dtype)
        shard = np.searchsorted(self._starts, unique, side="right") - 1
        breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(shard) != 0)) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(unique)]):
            s = int(shard[start])
            local = int(unique[start] - self._starts[s])
            f = self._file(s)
            try:
                data[start:stop] = shard_format.read_rows(f, self.shards[s], name, local, int(stop - start))
            except shard_format.ShardError as exc:
                raise MedialShardError(f"{exc}: restore it or collect again (MedialDataset(..., on_bad_shard='skip') "
                                       "cannot catch damage found while reading; run verify() first)") from None
        return data[inverse]

    def activations(self, candidate: str | int, rows: np.ndarray | None = None) -> np.ndarray:
        """[rows, *stored shape] stored activations of one candidate (every row when None: loads them all)."""
        return self.read(f"act_{self._index(candidate)}", np.arange(self.meta.num_samples) if rows is None else rows)

    @property
    def probs(self) -> np.ndarray:
        """[N, classes] backbone softmax of every row (loads it all; prefer :meth:`teacher` of some rows)."""
        return self.read("probs", np.arange(self.meta.num_samples))

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split ('train', 'tune', 'val' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS[split])

    def teacher(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """Backbone softmax for the given rows (all rows when None)."""
        return torch.from_numpy(self.read("probs", np.arange(self.meta.num_samples) if rows is None else rows))

    def top1(self, rows: np.ndarray | None = None, batch_size: int = 1024) -> torch.Tensor:
        """The backbone's top-1 class for the given rows, read in chunks."""
        rows = np.arange(self.meta.num_samples) if rows is None else np.asarray(rows)
        parts = [self.teacher(rows[i:i + batch_size]).argmax(1) for i in range(0, len(rows), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def batches(self, candidate: str | int, rows: np.ndarray, batch_size: int = 512):
        """Yield (stored activations as float32, teacher probs, rows) for the rows in order, batch by batch."""
        name = f"act_{self._index(candidate)}"
        rows = np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield (torch.from_numpy(self.read(name, chunk)).float(), torch.from_numpy(self.read("probs", chunk)),
                   chunk)

    def verify(self) -> None:
        """Read every row of every shard and check its checksum (MedialShardError naming the first damage)."""
        for s, shard in enumerate(self.shards):
            for name in shard.arrays:
                for start in range(0, shard.rows, 256):
                    try:
                        shard_format.read_rows(self._file(s), shard, name, start, min(256, shard.rows - start))
                    except shard_format.ShardError as exc:
                        raise MedialShardError(f"{exc}: restore it or collect again") from None

    def close(self) -> None:
        """Close the shard files this view holds open (they reopen on the next read)."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def __getstate__(self) -> dict:  # picklable (e.g. to worker processes): open files and the lock stay behind
        state = dict(self.__dict__)
        state["_files"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
