"""Train one exit head by KL self-distillation to the backbone's softmax (no labels anywhere).

Training streams from the medial dataset's shards: a head's training features (the output of its
parameter-free stem on the stored rows) and the teacher's probabilities are held in memory only when
they take at most ``DistillConfig.memory_mb``; beyond that each batch is read from the shards. The
batches and their order are the same either way (one seeded permutation per epoch), so the trained
head does not depend on the memory setting.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from selfxit.core.heads import split_stem
from selfxit.fit.medial import MedialDataset


@dataclass
class DistillConfig:
    """Training settings for one head."""

    epochs: int = 15
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 5e-4
    seed: int = 0
    memory_mb: float = 64.0  # training features (and teacher) per head held in memory up to this; beyond: streamed
    # KD temperature: KL between both softmaxes at this temperature, times its square (Hinton et al.). 2 and 4 were
    # measured on the shared ResNet-56 and did not pay (README, "More savings"), so the default stays 1.
    temperature: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"DistillConfig temperature must be a finite number > 0 (1: plain KL to the softmax); "
                             f"got {t!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.memory_mb < 0:
            raise ValueError(f"invalid DistillConfig {self}: epochs and batch_size >= 1, lr > 0, weight_decay >= 0, "
                             "memory_mb >= 0")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block (e.g. a head's initialisation) and restore the caller's
    generator state afterwards, so fitting never changes the random stream of the code around it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class StoredRows:
    """Per-row tensors computed from stored rows (``load(rows) -> Tensor``), indexable like a tensor
    (``x[batch]``, ``len(x)``): all held in memory when they take at most ``memory_bytes``, else each index
    reads its rows from the shards."""

    def __init__(self, load, rows: np.ndarray, row_bytes: int, memory_bytes: float):
        self.rows, self._load = np.asarray(rows), load
        self.in_memory = len(self.rows) * row_bytes <= memory_bytes
        self._all = load(self.rows) if self.in_memory else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        if self._all is not None:
            return self._all[index]
        index = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        return self._load(self.rows[index])


def _stored(medial: MedialDataset, candidate: str, rows: np.ndarray, chunk: int = 512):
    """Stored activations of ``rows`` as float32, chunk by chunk (activations only, not the teacher)."""
    for start in range(0, len(rows), chunk):
        yield torch.from_numpy(medial.activations(candidate, rows[start:start + chunk])).float()


def _mb(memory_mb: float | None) -> float:
    return DistillConfig.memory_mb * 2**20 if memory_mb is None else memory_mb * 2**20


def stem_features(stem: nn.Module, medial: MedialDataset, candidate: str, rows: np.ndarray,
                  memory_mb: float | None = None) -> StoredRows:
    """A head's parameter-free stem (``split_stem(head)[0]``) on the stored rows, as :class:`StoredRows`: the
    stored reduction is the stem's first op (see :meth:`MedialDataset.input_stage`), so only the rest runs."""
    stage = medial.input_stage(candidate, stem if isinstance(stem, nn.Sequential) else nn.Sequential(stem))
    shape = medial.meta.stored_shapes[medial.candidates.index(candidate)]
    with torch.no_grad():
        example = stage(torch.zeros(1, *shape))

    def load(subset: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            parts = [stage(x) for x in _stored(medial, candidate, subset)]
        return torch.cat(parts) if parts else example.new_zeros((0, *example.shape[1:]))

    return StoredRows(load, rows, example.numel() * 4, _mb(memory_mb))


def teacher_rows(medial: MedialDataset, rows: np.ndarray, memory_mb: float | None = None) -> StoredRows:
    """The backbone's softmax of ``rows`` as :class:`StoredRows` (in memory up to ``memory_mb``)."""
    return StoredRows(medial.teacher, rows, medial.meta.num_classes * 4, _mb(memory_mb))


def distill_head(head: nn.Sequential, medial: MedialDataset, candidate: str, rows: np.ndarray,
                 config: DistillConfig | None = None, progress: bool = True) -> nn.Sequential:
    """Train ``head`` on ``rows`` of the medial dataset to match the backbone's softmax (KL divergence).

    The stored activations are fixed inputs, so the backbone and every other head stay frozen.
    Returns the head in eval mode.
    """
    config = config or DistillConfig()
    if len(rows) == 0:
        raise ValueError(f"no training rows for head at {candidate!r}; collect more traffic")
    stem, body = split_stem(head)
    features = stem_features(stem, medial, candidate, rows, config.memory_mb)
    train_body(body, features, teacher_rows(medial, rows, config.memory_mb), config, candidate, progress)
    head.eval()
    return head


def train_body(body: nn.Module, features, teacher, config: DistillConfig, name: str = "head", progress: bool = True,
               weights: torch.Tensor | None = None) -> nn.Module:
    """The distillation loop: ``body(features[batch])`` to ``teacher[batch]`` by KL (AdamW, one-cycle schedule,
    one seeded permutation per epoch; both softmaxes at ``config.temperature``). ``features`` and ``teacher``
    index like tensors (:class:`StoredRows`).

    ``weights`` [rows] (e.g. survivor-aware distillation, :mod:`selfxit.fit.cascade`) weight each row's KL;
    a batch's loss is then ``sum(w * kl) / sum(w)``. Without them every row counts the same ("batchmean").
    """
    generator = torch.Generator().manual_seed(config.seed)
    n = len(features)
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    tau = float(config.temperature)
    body.train()
    bar = tqdm(range(config.epochs), desc=f"distill {name}", leave=False, disable=not progress)
    for _ in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            logits = body(features[batch])
            log_student = F.log_softmax(logits if tau == 1 else logits / tau, dim=1)
            target = teacher[batch] if tau == 1 else soften(teacher[batch], tau)
            if weights is None:
                loss = F.kl_div(log_student, target, reduction="batchmean")
            else:
                w = weights[batch]
                per_row = F.kl_div(log_student, target, reduction="none").sum(1)
                loss = (w * per_row).sum() / w.sum().clamp_min(1e-12)
            if tau != 1:
                loss = loss * tau ** 2  # keeps the gradients' scale independent of the temperature
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        bar.set_postfix(kl=f"{total / n:.4f}")
    body.eval()
    return body


def soften(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """The teacher's softmax at temperature ``tau`` from its stored softmax: ``softmax(log p / tau)`` (each row's
    log-sum-exp cancels, so the logits are not needed). A probability stored as 0 (float16 underflow) is taken
    as 1e-30, which stays negligible at any temperature under about 5."""
    return torch.softmax(probs.clamp_min(1e-30).log() / tau, dim=1)


def head_logit_chunks(head: nn.Module, medial: MedialDataset, candidate: str, rows: np.ndarray,
                      chunk: int = 512) -> Iterator[torch.Tensor]:
    """Raw logits of a trained head on stored rows, ``chunk`` rows at a time in the order given: what scoring
    reads, so that a split's [rows, classes] logits never need to be held at once."""
    stage = medial.input_stage(candidate, head)
    for x in _stored(medial, candidate, np.asarray(rows), chunk):
        with torch.no_grad():  # per chunk: a no_grad held across a yield would leak into the caller
            out = stage(x)
        yield out


def head_logits(head: nn.Module, medial: MedialDataset, candidate: str, rows: np.ndarray) -> torch.Tensor:
    """Raw logits of a trained head on stored rows (the head minus the reduction the store already applied)."""
    parts = list(head_logit_chunks(head, medial, candidate, rows))
    return torch.cat(parts) if parts else torch.empty(0)
