"""The medial dataset: per candidate, the reduction of its activation that its head consumes, plus the
backbone's softmax, in shards on a local folder or any fsspec URL.

Layout of a medial dataset::

    recording.json              written first: candidates, full and stored shapes, reductions, classes, seed,
                                traffic samples and the rows expected (what is being recorded)
    shards/<writer>-<seq>.shard blocks of rows (see :mod:`selfxit.fit.shards`): split (0 train, 1 tune,
                                2 val, 3 test; see SPLITS), source (traffic sample index), label (-1 when
                                unknown; reporting only), backbone softmax (float32), one array per candidate
    writers/<writer>.json       a writer's rows and shards, written when it finished
    manifest.json               written last, when every expected row is in: the meta and the shard list

Rows are numbered in shard order (writers by name, then sequence), which for one writer is the order
they were appended. Several processes (torchrun ranks, or any processes with distinct writer names)
fill one dataset at once, each with its own :class:`MedialWriter`; one of them finalizes it.

Memory stays bounded: a writer holds at most a few shards of rows (``shard_bytes``); a reader holds
only the per-row index (split, source, label, checksums: 17 + 4 x arrays bytes per row) and reads the
rows it is asked for. A dataset without a manifest (a recorder was killed, a rank died) reads back its
complete shards with a warning that says how many rows were lost.
"""
from __future__ import annotations

import json
import queue
import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from selfxit.core.heads import can_feed, describe_reduction, input_reduction, reducer, stored_stage
from selfxit.fit import shards as shard_format
from selfxit.fit.budget import DEFAULT_ROW_BUDGET, FULL_MAPS, MedialBudgetError, plan_storage, stored_bytes  # noqa: F401

SPLITS = {"train": 0, "tune": 1, "val": 2, "test": 3}
FORMAT_VERSION = 2
SHARD_BYTES = 32 * 1024 * 1024  # a writer cuts a shard when its buffered rows reach this
RECORDING, MANIFEST, SHARDS, WRITERS = "recording.json", "manifest.json", "shards", "writers"
OPEN_FILES = 16  # shard files a reader keeps open


class MedialStoreError(RuntimeError):
    """The medial dataset cannot be written or read where it was asked to be (the message says what to fix)."""


class MedialShardError(MedialStoreError):
    """Shards of the medial dataset are missing or damaged."""


class MedialIncompleteWarning(UserWarning):
    """The medial dataset holds fewer rows than were recorded into it (its recording did not finish)."""


@dataclass
class MedialMeta:
    """What a medial dataset holds. ``shapes`` are the candidates' full activation shapes; ``stored_shapes``
    what each stores per row under its ``reductions``."""

    candidates: list[str]
    shapes: list[tuple[int, ...]]
    num_samples: int  # rows (readable rows, for a dataset whose recording did not finish)
    num_classes: int
    seed: int
    format_version: int = FORMAT_VERSION
    reductions: list[dict] = field(default_factory=list)
    stored_shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtype: str = "float16"
    num_traffic: int | None = None  # traffic samples behind the rows (each once, train ones augmented too)
    expected_rows: int | None = None  # rows the recording announced
    budget: int | None = None  # bytes per row it was checked against

    @property
    def bytes_per_row(self) -> dict[str, int]:
        """Stored activation bytes per row of each candidate."""
        return {n: stored_bytes(s, r, dtype=self.dtype) for n, s, r in zip(self.candidates, self.shapes,
                                                                            self.reductions)}

    def to_json(self) -> dict:
        out = asdict(self)
        out["shapes"] = [list(s) for s in self.shapes]
        out["stored_shapes"] = [list(s) for s in self.stored_shapes]
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "MedialMeta":
        raw = dict(raw)
        raw["shapes"] = [tuple(s) for s in raw["shapes"]]
        raw["stored_shapes"] = [tuple(s) for s in raw.get("stored_shapes", [])]
        return cls(**raw)


def _fs(root: str | Path):
    """(fsspec filesystem, path on it, how to name it in messages) of a local folder or URL."""
    text = str(root)
    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is not installed
        raise MedialStoreError(f"cannot use {text!r} for the medial dataset: {exc}. Use a local folder or a URL "
                               "whose fsspec backend is installed (e.g. s3fs for s3://)") from None
    return fs, path.rstrip("/") or path, text


def _write_json(fs, path: str, data: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/{shard_format.TMP_PREFIX}{name}"
    with fs.open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
    fs.mv(tmp, path)


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise MedialStoreError(f"{path} is damaged ({exc}); collect the medial dataset again") from None


def create_medial(root: str | Path, meta: MedialMeta) -> None:
    """Start a medial dataset at ``root`` (replacing whatever is there): write ``recording.json``. Raises
    :class:`MedialStoreError` saying what to fix when the location cannot be written; nothing is left then."""
    fs, path, name = _fs(root)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(f"{path}/{SHARDS}", exist_ok=True)
        fs.makedirs(f"{path}/{WRITERS}", exist_ok=True)
        _write_json(fs, f"{path}/{RECORDING}", meta.to_json())
    except (OSError, PermissionError, ValueError, NotImplementedError) as exc:
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - best effort; the error below is the one to act on
            pass
        raise MedialStoreError(f"cannot write the medial dataset to {name}: {type(exc).__name__}: {exc}. Check that "
                               "the location exists and is writable (permissions, credentials), or pass another "
                               "out_dir") from exc


class MedialWriter:
    """Writes rows of a medial dataset as shards, from one process (give each process its own ``writer`` name).

    ``num_samples`` is the number of rows the whole dataset will hold. With ``join=False`` the dataset is
    created (replacing ``root``); with ``join=True`` this writer adds to one that another process created.
    ``reductions`` (default: full maps) say what each candidate stores; ``append`` takes each candidate's
    activation either full (it is reduced here) or already reduced. Shards are encoded and written by a
    background thread, so the caller's next batch runs meanwhile; at most two shards wait in memory.
    """

    def __init__(self, root: str | Path, candidates: list[str], shapes: list[tuple[int, ...]], num_samples: int,
                 num_classes: int, seed: int, *, reductions: list[dict] | None = None, dtype: str = "float16",
                 writer: str = "w0", join: bool = False, shard_bytes: int = SHARD_BYTES,
                 num_traffic: int | None = None, budget: int | None = None):
        self.fs, self.path, self.name = _fs(root)
        names = list(candidates)
        shapes = [tuple(int(d) for d in s) for s in shapes]
        heads = {n: r for n, r in zip(names, reductions)} if reductions is not None else FULL_MAPS
        plan = plan_storage(names, shapes, heads, budget, dtype)
        self.meta = MedialMeta(names, shapes, int(num_samples), int(num_classes), int(seed),
                               reductions=plan.reductions, stored_shapes=plan.stored_shapes, dtype=dtype,
                               num_traffic=num_traffic, expected_rows=int(num_samples), budget=budget)
        if not writer or "/" in writer or writer.startswith("."):
            raise ValueError(f"writer name must be a plain, non-empty file name; got {writer!r}")
        self.writer = writer
        if join:
            recorded = _read_json(self.fs, f"{self.path}/{RECORDING}")
            if recorded is None:
                raise MedialStoreError(f"{self.name} has no {RECORDING}: the process that creates the medial dataset "
                                       "must do so before others join it, at a location every writer can reach (a "
                                       "shared folder or URL; memory:// is per process)")
            mine = self.meta.to_json()
            differs = [k for k in ("candidates", "shapes", "reductions", "num_classes", "seed", "dtype")
                       if recorded.get(k) != mine[k]]
            if differs:
                raise MedialStoreError(f"{self.name} is being recorded with other {differs}; a joining writer must "
                                       "record the same candidates, reductions, classes and seed")
        else:
            create_medial(root, self.meta)
        self._reducers = [reducer(s, r) for s, r in zip(shapes, plan.reductions)]
        # Two shard buffers, allocated once and reused: one fills while the background thread writes the other,
        # so memory stays at two shards whatever the traffic (and the allocator sees no churn of large blocks).
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            "probs": (np.dtype(np.float32), (self.meta.num_classes,)),
            **{f"act_{i}": (np.dtype(dtype), tuple(st)) for i, st in enumerate(plan.stored_shapes)},
            "split": (np.dtype(np.uint8), ()), "source": (np.dtype(np.int64), ()), "labels": (np.dtype(np.int64), ())}
        row_bytes = sum(t.itemsize * int(np.prod(sh, dtype=np.int64)) for t, sh in self._layout.values())
        self.rows_per_shard = max(1, min(int(shard_bytes) // row_bytes, int(num_samples)))
        self._free: queue.Queue = queue.Queue()
        self._free.put(self._new_buffer())
        self._current = self._new_buffer()
        self._fill = 0
        self.filled = 0  # rows appended by this writer
        self.shards: list[str] = []
        self._seq = 0
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"medial-writer-{writer}", daemon=True)
        self._thread.start()
        self._closed = False

    def _new_buffer(self) -> dict[str, np.ndarray]:
        return {k: np.empty((self.rows_per_shard, *shape), dtype=t) for k, (t, shape) in self._layout.items()}

    # ---- writing ---------------------------------------------------------------------------------------
    def _convert(self, i: int, act: torch.Tensor) -> np.ndarray:
        name, shape, stored = self.meta.candidates[i], self.meta.shapes[i], self.meta.stored_shapes[i]
        act = act.detach()
        if tuple(act.shape[1:]) != tuple(stored):
            if tuple(act.shape[1:]) != tuple(shape):
                raise ValueError(f"activation of {name!r} has per-row shape {tuple(act.shape[1:])}; expected the full "
                                 f"{tuple(shape)} or the stored {tuple(stored)}")
            with torch.no_grad():
                act = self._reducers[i](act.float() if not act.is_floating_point() else act)
        return act.to(getattr(torch, self.meta.dtype)).cpu().numpy()

    def append(self, activations: list[torch.Tensor], probs: torch.Tensor, split: np.ndarray,
               source: np.ndarray, labels: np.ndarray) -> None:
        """Add one batch of rows."""
        self._check_open()
        n = len(probs)
        if len(activations) != len(self.meta.candidates):
            raise ValueError(f"got {len(activations)} activations for {len(self.meta.candidates)} candidates")
        if self.filled + n > self.meta.num_samples:
            raise ValueError(f"medial dataset is sized for {self.meta.num_samples} rows; got more")
        rows = {"probs": probs.detach().float().cpu().numpy(),
                **{f"act_{i}": self._convert(i, a) for i, a in enumerate(activations)},
                "split": np.asarray(split), "source": np.asarray(source), "labels": np.asarray(labels)}
        if any(len(a) != n for a in rows.values()):
            raise ValueError(f"activations, probs, split, source and labels of one batch must have the same rows ({n})")
        done = 0
        while done < n:
            take = min(n - done, self.rows_per_shard - self._fill)
            for k, a in rows.items():
                self._current[k][self._fill:self._fill + take] = a[done:done + take]
            self._fill += take
            done += take
            if self._fill == self.rows_per_shard:
                self._cut()
        self.filled += n

    def _cut(self, final: bool = False) -> None:
        if self._fill == 0:
            return
        name = f"{self.writer}-{self._seq:06d}{shard_format.SUFFIX}"
        self._seq += 1
        self._queue.put((name, self._current, self._fill))
        self._fill = 0
        while not final:  # the other buffer, once the thread has written it
            self._check_open(error_only=True)
            try:
                self._current = self._free.get(timeout=0.5)
                return
            except queue.Empty:
                continue

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, buffer, rows = item
            if self._error is None:  # after a failed shard the rest are dropped: the caller gets the error
                try:
                    arrays = {k: v[:rows] for k, v in buffer.items() if k.startswith(("probs", "act_"))}
                    index = {k: buffer[k][:rows] for k in ("split", "source", "labels")}
                    shard_format.write(self.fs, f"{self.path}/{SHARDS}/{name}", arrays, index, self.writer,
                                       int(name.rsplit("-", 1)[1].split(".")[0]))
                    self.shards.append(name)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc
            self._free.put(buffer)

    def _check_open(self, error_only: bool = False) -> None:
        if self._error is not None:
            exc = self._error
            raise MedialStoreError(f"writing a shard of the medial dataset to {self.name} failed: "
                                   f"{type(exc).__name__}: {exc}. The complete shards are kept; check the "
                                   "location (space, permissions) and collect again") from exc
        if not error_only and self._closed:
            raise RuntimeError("this medial writer is closed")

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self, finalize: bool = True) -> "MedialDataset | None":
        """Write the remaining rows and this writer's record; with ``finalize`` (the only writer, or the last
        one) also the manifest, and return the dataset. A dataset short of its rows gets no manifest: a
        RuntimeError says how many rows it has, and its complete shards stay readable."""
        self._check_open()
        self._cut(final=True)
        self._stop()
        self._closed = True
        self._check_open(error_only=True)
        _write_json(self.fs, f"{self.path}/{WRITERS}/{self.writer}.json",
                    {"writer": self.writer, "rows": self.filled, "shards": sorted(self.shards)})
        return finalize_medial(self.name) if finalize else None

    def abort(self) -> None:
        """Stop without writing the buffered rows: complete shards stay, nothing half-written is left."""
        self._fill, self._closed = 0, True
        self._stop()

    def __enter__(self) -> "MedialWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None and not self._closed:
            self.abort()


# ---- finishing and reading ----------------------------------------------------------------------------------

def _listing(fs, path: str) -> dict[str, int]:
    """{file name: size} of the complete shards under ``path``/shards."""
    try:
        entries = fs.ls(f"{path}/{SHARDS}", detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(shard_format.SUFFIX) and not name.startswith(shard_format.TMP_PREFIX):
            out[name] = int(e["size"])
    return out


def _read_indices(fs, path: str, names: list[str], sizes: dict[str, int]):
    """(shard indices, {name: problem}) for the named shards."""
    paths = [f"{path}/{SHARDS}/{n}" for n in names]
    indices: list[shard_format.ShardIndex] = []
    bad: dict[str, str] = {}
    if not names:
        return indices, bad
    prefixes = fs.cat_ranges(paths, [0] * len(paths), [min(shard_format.PREFIX_BYTES, sizes[n]) for n in names],
                             on_error="return")  # concurrent on remote (async) filesystems
    for name, p, prefix in zip(names, paths, prefixes):
        if isinstance(prefix, BaseException):
            bad[name] = f"cannot be read ({type(prefix).__name__}: {prefix})"
            continue
        try:
            indices.append(shard_format.parse(p, prefix, sizes[name],
                                              lambda start, end, p=p: fs.cat_file(p, start, end)))
        except (shard_format.ShardError, ValueError, KeyError) as exc:
            bad[name] = str(exc).replace(f"shard {p} is ", "") if isinstance(exc, shard_format.ShardError) else \
                f"damaged ({type(exc).__name__}: {exc})"
    return indices, bad


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def finalize_medial(root: str | Path) -> "MedialDataset":
    """Write the manifest of a medial dataset whose writers are all done, and open it. When rows are missing
    (a writer died or did not close) no manifest is written and a RuntimeError says how many; the complete
    shards stay readable (``MedialDataset`` warns about the lost rows)."""
    fs, path, name = _fs(root)
    recorded = _read_json(fs, f"{path}/{RECORDING}")
    if recorded is None:
        raise MedialStoreError(f"{name} is not a medial dataset being recorded (no {RECORDING})")
    meta = MedialMeta.from_json(recorded)
    sizes = _listing(fs, path)
    indices, bad = _read_indices(fs, path, sorted(sizes), sizes)
    if bad:
        raise MedialShardError(f"cannot finish the medial dataset {name}: "
                               + "; ".join(f"shard {n} {why}" for n, why in bad.items())
                               + ". Collect again (the damaged shards cannot be used)")
    rows = sum(i.rows for i in indices)
    if rows != meta.expected_rows:
        raise RuntimeError(f"medial dataset got {rows} of {meta.expected_rows} rows; its {len(indices)} complete shards "
                           f"are kept in {name} and read back with the rest marked lost. Collect again to record all")
    manifest = {"format_version": FORMAT_VERSION, "meta": {**meta.to_json(), "num_samples": rows},
                "shards": [{"file": i.path.rsplit("/", 1)[-1], "rows": i.rows, "bytes": i.size} for i in indices],
                "bytes_per_row": meta.bytes_per_row}
    _write_json(fs, f"{path}/{MANIFEST}", manifest)
    return MedialDataset(name)


class MedialDataset:
    """Read-only view of a medial dataset (folder or URL). Only the per-row index is held in memory; rows are
    read from the shards on demand, each checked against its checksum.

    ``on_bad_shard``: 'raise' (default) refuses a dataset with missing or damaged shards, naming them;
    'skip' reads the other shards and warns how many rows were lost.
    """

    def __init__(self, root: str | Path, *, on_bad_shard: str = "raise"):
        if on_bad_shard not in ("raise", "skip"):
            raise ValueError(f"on_bad_shard must be 'raise' or 'skip'; got {on_bad_shard!r}")
        self.fs, self._path, self.location = _fs(root)
        local = isinstance(self.fs, LocalFileSystem)
        self.root: Path | str = Path(self._path) if local else self.location  # a Path for local folders
        self.location = str(self.root)  # absolute folder, or the URL
        manifest = _read_json(self.fs, f"{self._path}/{MANIFEST}")
        recording = None if manifest is not None else _read_json(self.fs, f"{self._path}/{RECORDING}")
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
        sizes = _listing(self.fs, self._path)
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
        indices, bad = _read_indices(self.fs, self._path, names, sizes)
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

    def top1(self, rows: np.ndarray | None = None, batch_size: int = 4096) -> torch.Tensor:
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
