"""Train one exit head by KL self-distillation to the backbone's softmax (no labels anywhere)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from dataclasses import dataclass

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

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid DistillConfig {self}: epochs and batch_size >= 1, lr > 0, weight_decay >= 0")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block (e.g. a head's initialisation) and restore the caller's
    generator state afterwards, so fitting never changes the random stream of the code around it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def stem_features(stem: nn.Module, medial: MedialDataset, candidate: str, rows: np.ndarray) -> torch.Tensor:
    """Apply a head's parameter-free stem to the stored activations of the given rows, chunk by chunk."""
    with torch.no_grad():
        return torch.cat([stem(x) for x, _, _ in medial.batches(candidate, rows)])


def distill_head(head: nn.Sequential, medial: MedialDataset, candidate: str, rows: np.ndarray,
                 config: DistillConfig | None = None, progress: bool = True) -> nn.Sequential:
    """Train ``head`` on ``rows`` of the medial dataset to match the backbone's softmax (KL divergence).

    The stored activations are fixed inputs, so the backbone and every other head stay frozen.
    Returns the head in eval mode.
    """
    config = config or DistillConfig()
    if len(rows) == 0:
        raise ValueError(f"no training rows for head at {candidate!r}; collect more traffic")
    generator = torch.Generator().manual_seed(config.seed)
    stem, body = split_stem(head)
    features = stem_features(stem, medial, candidate, rows)
    teacher = medial.teacher(rows)
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(rows) + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    body.train()
    bar = tqdm(range(config.epochs), desc=f"distill {candidate}", leave=False, disable=not progress)
    for _ in bar:
        order = torch.randperm(len(rows), generator=generator)
        total = 0.0
        for start in range(0, len(rows), config.batch_size):
            batch = order[start:start + config.batch_size]
            log_student = F.log_softmax(body(features[batch]), dim=1)
            loss = F.kl_div(log_student, teacher[batch], reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        bar.set_postfix(kl=f"{total / len(rows):.4f}")
    head.eval()
    return head


def head_logits(head: nn.Module, medial: MedialDataset, candidate: str, rows: np.ndarray) -> torch.Tensor:
    """Raw logits of a trained head on stored rows."""
    with torch.no_grad():
        return torch.cat([head(x) for x, _, _ in medial.batches(candidate, rows)]) if len(rows) else torch.empty(0)
