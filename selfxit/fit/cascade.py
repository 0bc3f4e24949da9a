"""Cascaded, ensembled and survivor-aware exit heads (``FitConfig(cascade=True, survivor_rounds=R)``).

After the independent heads are trained and the default cascade is designed on *tune*, the exits of that
design become a chain (:mod:`selfxit.core.cascade`): each chain head is warm-started from its independent
head, also reads the previous member's log-softmax (Zero Time Waste's cascade connection) and answers with a
geometric ensemble of the chain so far, whose weights are fitted by KL to the backbone on *train*. The
chain's heads are distilled on *train* only, their temperatures fitted on *tune*, the cascade is then
designed again on *tune* and certified on the untouched *val* split, exactly as for independent heads.

**Survivor-aware distillation** (``survivor_rounds`` = R > 0; after CalexNet's heads trained on the samples
that actually arrive): the chain is trained R + 1 times. After each round the cascade is designed on *tune*
and the *train* rows are routed through it; in the next round each head's KL (and its ensemble's) weighs
the rows that reach it 1 and the others ``SURVIVOR_FLOOR``. Only *tune* designs; *val* stays clean.

A chain member that the chosen cascade turns off but a later active member reads stays in the chain at its
counted cost (:data:`selfxit.core.cascade.PASS_THROUGH`); members after the last active one are dropped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from selfxit.core.cascade import PASS_THROUGH, ChainedHead
from selfxit.core.exits import ExitRecord
from selfxit.core.flops import count_flops
from selfxit.core.heads import split_stem
from selfxit.fit import select
from selfxit.fit.calibrate import fit_temperature
from selfxit.fit.distill import seeded, stem_features, teacher_rows, train_body
from selfxit.fit.medial import MedialDataset

SURVIVOR_FLOOR = 0.25  # weight of a train row that an earlier exit of the designed cascade answers
SPLITS = ("train", "tune", "val", "test")
CHUNK = 2048


@dataclass
class Chain:
    """The fitted chain: its records (chained heads, temperatures; thresholds not set yet), their calibrated
    log-probabilities and max-softmax statistics per split, and the rounds' designed costs on *tune*."""

    records: list[ExitRecord]
    log_probs: dict[str, torch.Tensor]  # split -> [members, N, C]
    stats: dict[str, select.ExitStats]
    rounds: list[dict]


class _Joined:
    """Rows of (stem features | previous member's log-softmax), indexable like a tensor for ``train_body``."""

    def __init__(self, features, previous: torch.Tensor | None):
        self.features, self.previous = features, previous

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index) -> torch.Tensor:
        f = self.features[index]
        return f if self.previous is None else torch.cat([f, self.previous[index]], dim=1)


class _JoinedBody(torch.nn.Module):
    """A chained head's trainable part on :class:`_Joined` rows (its parameters are the head's own)."""

    def __init__(self, head: ChainedHead, width: int):
        super().__init__()
        self.head, self.width = head, width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.head.reads_previous:
            return self.head.body_from_features(z, None)
        return self.head.body_from_features(z[:, :self.width], z[:, self.width:])


def _own(head: ChainedHead, features, previous: torch.Tensor | None) -> torch.Tensor:
    """[N, C] own log-softmax of ``head`` over all rows of ``features`` (chunked)."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(features), CHUNK):
            index = torch.arange(start, min(start + CHUNK, len(features)))
            prev = None if previous is None else previous[index]
            parts.append(F.log_softmax(head.body_from_features(features[index], prev), dim=1))
    return torch.cat(parts) if parts else torch.zeros(0, head.num_classes)


def fit_ensemble(head: ChainedHead, own: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None,
                 steps: int = 300, lr: float = 0.05) -> None:
    """Fit ``head``'s ensemble weights and bias by (weighted) KL to the backbone's softmax ``teacher`` [N, C],
    from the chain's own log-softmaxes ``own`` [position + 1, N, C] (full batch; the heads stay fixed)."""
    params = [head.log_weights, head.bias]
    optimizer = torch.optim.Adam(params, lr=lr)
    w = torch.ones(own.shape[1]) if weights is None else weights
    for _ in range(steps):
        log_student = F.log_softmax(head.ensemble(own), dim=1)
        loss = (w * F.kl_div(log_student, teacher, reduction="none").sum(1)).sum() / w.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _stats(log_probs: torch.Tensor, top1: torch.Tensor, head_flops, remaining, backbone_flops) -> select.ExitStats:
    probs = log_probs.exp()
    return select.ExitStats(probs.amax(2).numpy(), (probs.argmax(2) == top1[None]).numpy(), head_flops, remaining,
                            backbone_flops)


def survivor_weights(stats: select.ExitStats, shape: np.ndarray, floor: float = SURVIVOR_FLOOR) -> torch.Tensor:
    """[members, N] weight of each row for each chain member: 1 where it reaches the member under ``shape``
    (no earlier active member fires), else ``floor``."""
    taken = select.exit_assignment(stats, select.scaled_thresholds(shape, 1.0))
    members = np.arange(stats.num_exits)[:, None]
    reach = (taken[None, :] < 0) | (taken[None, :] >= members)
    return torch.from_numpy(np.where(reach, 1.0, floor)).float()


def fit_chain(records: dict[str, ExitRecord], layers: list[str], remaining: dict[str, int], medial: MedialDataset,
              rows: dict[str, np.ndarray], top1: dict[str, torch.Tensor], config, num_classes: int,
              backbone_flops: int, progress: bool = True, ensemble_split: str = "train") -> Chain:
    """Train the chain of ``layers`` (forward order) from their independent heads in ``records``.

    ``ensemble_split`` (``FitConfig.ensemble_split``): where the ensemble weights are fitted: 'train', as Zero
    Time Waste does, or 'tune', where the heads were not distilled and so are not overconfident (measured in
    ``benchmarks/savings.py``: it saves more). Survivor weights apply to the ensemble only on 'train'."""
    teacher = {s: teacher_rows(medial, rows[s], config.distill.memory_mb) for s in SPLITS}
    teacher_train = teacher["train"][torch.arange(len(rows["train"]))]
    top1 = dict(top1, train=teacher_train.argmax(1))
    weights: torch.Tensor | None = None
    rounds: list[dict] = []
    for round_ in range(1 + config.survivor_rounds):
        chain: list[ExitRecord] = []
        own: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
        log_probs: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
        for position, layer in enumerate(tqdm(layers, desc=f"chain round {round_}", disable=not progress)):
            independent = records[layer]
            with seeded(config.distill.seed + position):
                head = ChainedHead(copy.deepcopy(independent.head), num_classes, position)
            object.__setattr__(head, "_independent", [independent.head])  # for a later fit to reuse, unregistered
            stem = split_stem(cast(torch.nn.Sequential, head.head))[0]
            features = {s: stem_features(stem, medial, layer, rows[s], config.distill.memory_mb) for s in SPLITS}
            previous = {s: own[s][-1] if own[s] and head.reads_previous else None for s in SPLITS}
            width = int(features["train"][torch.arange(1)].shape[1])
            w = None if weights is None else weights[position]
            train_body(_JoinedBody(head, width), _Joined(features["train"], previous["train"]), teacher["train"],
                       config.distill, f"chain {layer}", progress, weights=w)
            for s in SPLITS:
                own[s].append(_own(head, features[s], previous[s]))
            if ensemble_split == "train":
                fit_ensemble(head, torch.stack(own["train"]), teacher_train, w)
            else:
                fit_ensemble(head, torch.stack(own[ensemble_split]),
                             teacher[ensemble_split][torch.arange(len(rows[ensemble_split]))], None)
            with torch.no_grad():
                logits = {s: head.ensemble(torch.stack(own[s])) for s in SPLITS}
            temperature = fit_temperature(logits["tune"], top1["tune"])
            for s in SPLITS:
                log_probs[s].append(F.log_softmax(logits[s] / temperature, dim=1))
            flops = count_flops(head.head, torch.zeros(1, *independent.shape)) + head.extra_flops()
            chain.append(ExitRecord(layer, head.eval(), temperature, None, None, independent.spec,
                                    independent.shape, flops))
        head_flops = [r.head_flops for r in chain]
        rest = [remaining[layer] for layer in layers]
        stacked = {s: torch.stack(v) for s, v in log_probs.items()}
        stats = {s: _stats(stacked[s], top1[s], head_flops, rest, backbone_flops) for s in SPLITS}
        shape = select.design_shape(stats["tune"], config.tolerance, config.max_exits, config.design_factor)
        designed = select.evaluate_cascade(stats["tune"], shape)
        rounds.append({"round": round_, "tune_flops": designed.flops_fraction, "tune_drop": designed.drop,
                       "active": [layers[k] for k in designed.active]})
        weights = survivor_weights(stats["train"], shape)
    return Chain(chain, {s: stacked[s] for s in ("tune", "val", "test")},
                 {s: stats[s] for s in ("tune", "val", "test")}, rounds)


def with_pass_through(thresholds: np.ndarray) -> np.ndarray:
    """Chain thresholds with the members before the last active one that are off set to PASS_THROUGH (they run,
    are counted, never answer); members after it stay off (no later head reads them)."""
    thresholds = np.array(thresholds, dtype=np.float64)
    active = np.flatnonzero(np.isfinite(thresholds))
    if len(active):
        before = np.arange(active[-1])
        off = before[~np.isfinite(thresholds[before])]
        thresholds[off] = PASS_THROUGH
    return thresholds


def chain_members(layers: list[str], thresholds: np.ndarray, shape: np.ndarray | None) -> list[str]:
    """The layers a chain is built from: the designed shape's exits (else the chosen thresholds' ones)."""
    source = shape if shape is not None and np.isfinite(shape).any() else thresholds
    return [layers[k] for k in np.flatnonzero(np.isfinite(source))]
