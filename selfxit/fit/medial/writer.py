"""Writing a medial dataset: one :class:`MedialWriter` per process, then :func:`finalize_medial` once every
writer is done (layout and memory bounds: :mod:`selfxit.fit.medial.store`)."""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import torch

import selfxit.fit.medial.shards as shard_format
from selfxit.core.heads import reducer
from selfxit.fit.medial.budget import FULL_MAPS, plan_storage
from selfxit.fit.medial.dataset import MedialDataset
from selfxit.fit.medial.store import (
    FORMAT_VERSION,
    MANIFEST,
    RECORDING,
    SHARD_BYTES,
    SHARDS,
    WRITERS,
    MedialMeta,
    MedialShardError,
    MedialStoreError,
    create_medial,
    fs_of,
    listing,
    read_indices,
    read_json,
    write_json,
)


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
        self.fs, self.path, self.name = fs_of(root)
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
            recorded = read_json(self.fs, f"{self.path}/{RECORDING}")
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
        write_json(self.fs, f"{self.path}/{WRITERS}/{self.writer}.json",
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


def finalize_medial(root: str | Path) -> "MedialDataset":
    """Write the manifest of a medial dataset whose writers are all done, and open it. When rows are missing
    (a writer died or did not close) no manifest is written and a RuntimeError says how many; the complete
    shards stay readable (``MedialDataset`` warns about the lost rows)."""
    fs, path, name = fs_of(root)
    recorded = read_json(fs, f"{path}/{RECORDING}")
    if recorded is None:
        raise MedialStoreError(f"{name} is not a medial dataset being recorded (no {RECORDING})")
    meta = MedialMeta.from_json(recorded)
    sizes = listing(fs, path)
    indices, bad = read_indices(fs, path, sorted(sizes), sizes)
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
    write_json(fs, f"{path}/{MANIFEST}", manifest)
    return MedialDataset(name)
