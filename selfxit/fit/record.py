"""Record the medial dataset: at each candidate layer (forward hooks) the reduction of its activation
that its head consumes, and the backbone's softmax.

The reduction runs inside the hook, on the backbone's device, as soon as the layer returns: the full map
is never kept (nor copied to the host), and a later in-place op (e.g. ``ReLU(inplace=True)`` after a
BatchNorm candidate) cannot change what was recorded. Rows stream to shards (:mod:`selfxit.fit.medial`),
so memory does not grow with the traffic.

Several processes record one dataset with ``torch.distributed`` (torchrun ranks, any backend): every rank
is given the whole traffic and records samples ``rank, rank + world, ...``; rank 0 creates the dataset,
each rank writes its own shards, and rank 0 writes the manifest once all have finished. A rank that dies
or hangs makes the others fail at the next barrier with an error naming it; the complete shards stay.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from selfxit.core.heads import reducer
from selfxit.core.hooks import split_batch
from selfxit.fit.augment import AugmentConfig, augment, augmented_copies  # noqa: F401 - augment: re-exported
from selfxit.fit.medial import SHARD_BYTES, SPLITS, MedialDataset, MedialStoreError, MedialWriter, finalize_medial
from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET, plan_storage
from selfxit.zoo.data import split_indices

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


@contextlib.contextmanager
def reducing_capture(model: nn.Module, layers: list[str], reducers: list[nn.Module], dtype: torch.dtype):
    """Forward hooks keeping, per named layer, ``reducer(output)`` cast to ``dtype`` (always a copy) in the
    yielded dict; removed on leaving the block, even when the forward pass raised."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of the model")
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name, reduce):
        def run(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"candidate layer {name!r} returned {type(output).__name__}, not a tensor")
            store[name] = reduce(output.detach()).to(dtype=dtype, copy=True)
        return run

    try:
        for name, reduce in zip(layers, reducers):  # reducers are parameter-free: they run on any device
            handles.append(modules[name].register_forward_hook(hook(name, reduce)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _heap_trimmer():
    """glibc's ``malloc_trim(0)``: hand the heap's free pages back to the OS (a no-op without glibc).

    Why: recording allocates activations of varying sizes (an augmented batch is the batch's random train
    subset), which fragments glibc's heap once its mmap threshold has adapted upwards, and RSS then creeps up
    with the traffic (CIFAR ResNet-20, full maps: +170 MB over 7,000 images). Trimming after every forward
    pass keeps it flat, for about 1% of the recording time. It changes no allocator setting."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class _Ranks:
    """This process's place among the recorders (``torch.distributed`` when initialised) and the barriers."""

    def __init__(self, timeout: float | None):
        import torch.distributed as dist
        self.dist: Any = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.timeout = None if timeout is None else _dt.timedelta(seconds=timeout)

    def barrier(self, stage: str, location: str) -> None:
        if self.world == 1:
            return
        try:
            if self.dist.get_backend() == "gloo":  # names the ranks that did not arrive
                self.dist.monitored_barrier(timeout=self.timeout, wait_all_ranks=True)
            else:
                self.dist.barrier()
        except RuntimeError as exc:
            raise MedialStoreError(
                f"recorder rank {self.rank}: not every rank reached '{stage}' (a rank died or hung): {exc}. The "
                f"complete shards are kept in {location}; MedialDataset({location!r}) reads them back and says how "
                f"many rows were lost. Fix the failing rank and collect again to record every row") from exc

    def share(self, error: str | None) -> str | None:
        """Rank 0's error (or None) on every rank."""
        if self.world == 1:
            return error
        box = [error if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


@torch.no_grad()
def record(backbone: nn.Module, layers: list[str], shapes: list[tuple[int, ...]], num_classes: int, loader,
           num_samples: int, out_dir: str | Path, seed: int = 0, augment_copies: int | AugmentConfig | dict = 2,
           progress: bool = True, *, heads=None, budget: int | None = DEFAULT_ROW_BUDGET, dtype: str = "float16",
           shard_bytes: int = SHARD_BYTES, rank_timeout: float | None = None) -> MedialDataset:
    """Run the frozen backbone over ``loader`` and write the medial dataset to ``out_dir`` (folder or fsspec URL).

    ``num_samples`` is the whole traffic; ``loader`` yields this process's share in a fixed order: all of it
    (one process), or samples ``rank, rank + world, ...`` under ``torch.distributed``. Train-split samples are
    also recorded ``augment_copies`` more times under random flips/shifts (an int), or under the copies of an
    :class:`~selfxit.fit.augment.AugmentConfig` (or a mapping of its keys: mixup, cutmix, colour jitter): the
    backbone labels them itself, so this adds distillation data without labels; tune/val/test rows stay clean. ``heads`` (one spec, {layer: spec}, or 'full') say what
    each candidate stores (default: full maps when they fit ``budget``, else the default head's input, a 4x4
    grid of conv maps; see :func:`selfxit.fit.medial.budget.plan_storage`); the rows must fit ``budget`` bytes,
    checked before anything is recorded. ``rank_timeout``: seconds a rank waits for the
    others at a barrier (default: the process group's timeout).
    """
    if backbone.training:
        raise RuntimeError("the backbone must be in eval mode while recording (BatchNorm statistics would move)")
    augmentation = AugmentConfig.coerce(augment_copies)
    plan = plan_storage(list(layers), [tuple(s) for s in shapes], heads, budget, dtype)  # before anything is written
    ranks = _Ranks(rank_timeout)
    split = assign_splits(num_samples, seed)
    mine = np.arange(ranks.rank, num_samples, ranks.world)
    n_train = int((split == SPLITS["train"]).sum())
    open_writer = functools.partial(
        MedialWriter, out_dir, list(layers), [tuple(s) for s in shapes], num_samples + augmentation.rows_per_train_sample * n_train,
        num_classes, seed, reductions=plan.reductions, dtype=dtype, shard_bytes=shard_bytes, num_traffic=num_samples,
        budget=budget, writer="w0" if ranks.world == 1 else f"r{ranks.rank:04d}")
    writer, error = None, None
    if ranks.rank == 0:
        try:
            writer = open_writer()
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised here
            error = f"{type(exc).__name__}: {exc}"
            if ranks.world == 1:
                raise
    error = ranks.share(error)
    if error is not None:
        raise MedialStoreError(f"rank 0 could not create the medial dataset: {error}")
    if writer is None:
        writer = open_writer(join=True)
    location = writer.name
    generator = torch.Generator().manual_seed(seed + 7919 * ranks.rank)
    device = _device(backbone)
    reducers = [reducer(s, r) for s, r in zip(shapes, plan.reductions)]
    trim = _heap_trimmer()
    seen = 0
    with writer, reducing_capture(backbone, list(layers), reducers, getattr(torch, dtype)) as store, \
            tqdm(total=len(mine), desc="collect", unit="img", disable=not progress or ranks.rank != 0) as bar:
        for batch in loader:
            x, labels = split_batch(batch)
            if seen + len(x) > len(mine):
                raise ValueError(f"traffic has more than the {num_samples} samples announced")
            rows = mine[seen:seen + len(x)]
            labels_np = labels.numpy() if labels is not None else np.full(len(x), -1)
            probs = backbone(x.to(device)).softmax(dim=1)
            writer.append([store.pop(name) for name in layers], probs, split[rows], rows, labels_np)
            trim()
            train = split[rows] == SPLITS["train"]
            for copy, mixed in augmented_copies(x[torch.from_numpy(train)], generator, augmentation) \
                    if train.any() else ():
                probs = backbone(copy.to(device)).softmax(dim=1)  # the backbone labels the copy itself
                writer.append([store.pop(name) for name in layers], probs, split[rows][train], rows[train],
                              np.full(int(train.sum()), -1) if mixed else labels_np[train])
                trim()
            seen += len(x)
            bar.update(len(x))
        if seen != len(mine):
            raise ValueError(f"traffic ended after {seen} of {len(mine)} samples"
                             + (f" (rank {ranks.rank}'s share of {num_samples})" if ranks.world > 1 else ""))
        writer.close(finalize=False)
        if ranks.world == 1:
            return finalize_medial(location)
    ranks.barrier("all shards written", location)
    error = None
    if ranks.rank == 0:
        try:
            finalize_medial(location)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks
            error = f"{type(exc).__name__}: {exc}"
    error = ranks.share(error)
    if error is not None:
        raise MedialStoreError(f"rank 0 could not finish the medial dataset {location}: {error}")
    return MedialDataset(location)
