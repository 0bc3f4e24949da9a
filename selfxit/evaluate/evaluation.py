"""Measure an early-exit model on traffic: FLOPs, agreement, accuracy, exit rates and CPU latency ratios."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from selfxit.core.hooks import split_batch
from selfxit.core.latency import alternate
from selfxit.core.runtime import FINAL


@dataclass
class Evaluation:
    """Numbers of one evaluation run (latency ratios are early-exit time / backbone time, same run)."""

    num_samples: int
    flops_fraction: float
    agreement: float
    accuracy_backbone: float | None
    accuracy_early_exit: float | None
    exit_rates: dict[str, float]
    exit_agreement: dict[str, float]
    exit_accuracy: dict[str, float | None]
    latency_ratio_b1: float | None
    latency_ratio_b32: float | None
    backbone_ms_b1: float | None
    tolerance: float | None
    # every threshold above reach (every exit runs, none fires) over the backbone, timed in the same run
    latency_ratio_nofire_b1: float | None = None
    latency_ratio_nofire_b32: float | None = None


def cost_per_exit(ee) -> np.ndarray:
    """FLOPs of a sample answered at each active exit (last entry: answered by the backbone).

    A sample pays for the backbone up to its exit plus every head it passed, and their learned gates.
    """
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    spent_heads, costs = 0, []
    for layer in ee.thresholds:
        gate = ee.gates.get(layer) if ee.gate == "learned" else None
        spent_heads += ee.head_flops[layer] + (gate.flops() if gate is not None else 0)
        costs.append(ee.backbone_flops - remaining[layer] + spent_heads)
    return np.array(costs + [ee.backbone_flops + spent_heads], dtype=np.float64)


def _latency_ratio(ee, inputs: torch.Tensor, batch_size: int, max_batches: int) -> tuple[float, float]:
    """(early-exit / backbone wall time, backbone ms per batch) on consecutive batches of ``inputs``,
    timed by :func:`selfxit.core.latency.alternate` (the same timer as the report's)."""
    ratio, _, backbone_ms = _latency_ratios(ee, inputs, batch_size, max_batches)
    return ratio, backbone_ms


def _latency_ratios(ee, inputs: torch.Tensor, batch_size: int, max_batches: int) -> tuple[float, float | None, float]:
    """(early-exit / backbone, no-fire / backbone, backbone ms per batch), the three timed in one
    :func:`~selfxit.core.latency.alternate` run. The backbone is run the way the model runs (``ee.plain()``:
    on the bucketed runtime, padded to the same buckets and compiled the same way); the no-fire run
    (``ee.no_fire()``) has every threshold above reach. Models without those (tests) time the bare backbone."""
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs) - batch_size + 1, batch_size)][:max_batches]
    if not batches:
        return float("nan"), None, float("nan")
    backbone = ee.plain() if hasattr(ee, "plain") else ee.backbone
    runs = {"backbone": lambda x, _cb: backbone(x), "early_exit": lambda x, _cb: ee(x)}
    if hasattr(ee, "no_fire"):
        no_fire = ee.no_fire()
        runs["no_fire"] = lambda x, _cb: no_fire(x)
    timings = alternate(runs, batches)
    plain = timings["backbone"].total
    worst = timings["no_fire"].total / plain if "no_fire" in timings else None
    return timings["early_exit"].total / plain, worst, 1000 * plain / len(batches)


def evaluate(ee, loader, latency: bool = True, latency_samples: int = 256, progress: bool = True,
             reference: torch.Tensor | None = None) -> Evaluation:
    """Run ``ee`` and the plain backbone over ``loader`` (batches ``x`` or ``(x, labels, ...)``).

    ``reference``: the backbone's top-1 for every sample in loader order, when already known (e.g. to
    compare two bundles on the same data without running the backbone twice).
    """
    costs = cost_per_exit(ee)
    seen = 0
    names = list(ee.thresholds) + ["final"]
    exits, agree, hits_bb, hits_ee, labels_all, kept_inputs = [], [], [], [], [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="evaluate", disable=not progress):
            x, labels = split_batch(batch)
            if reference is None:
                backbone_top1 = ee.backbone(x).argmax(1)
            else:
                backbone_top1 = reference[seen:seen + len(x)]
                if len(backbone_top1) != len(x):
                    raise ValueError(f"reference holds {len(reference)} answers; the data has more samples")
            seen += len(x)
            out = ee(x)
            exits.append(out.exit.numpy())
            agree.append((out.predictions == backbone_top1).numpy())
            if labels is not None:
                labels_all.append(labels.numpy())
                hits_bb.append((backbone_top1 == labels).numpy())
                hits_ee.append((out.predictions == labels).numpy())
            if latency and sum(len(k) for k in kept_inputs) < max(latency_samples, 32 * 8):
                kept_inputs.append(x)
    if not exits:
        raise ValueError("nothing to evaluate: the data is empty")
    if reference is not None and seen != len(reference):
        raise ValueError(f"reference holds {len(reference)} answers for {seen} samples")
    exit_idx = np.concatenate(exits)
    position = np.where(exit_idx == FINAL, len(names) - 1, exit_idx)
    agree_all = np.concatenate(agree)
    labelled = bool(labels_all) and (np.concatenate(labels_all) >= 0).all()
    hit_ee = np.concatenate(hits_ee) if labelled else None
    by_exit = {name: position == k for k, name in enumerate(names)}
    result = Evaluation(
        num_samples=len(exit_idx),
        flops_fraction=float(costs[position].mean() / ee.backbone_flops),
        agreement=float(agree_all.mean()),
        accuracy_backbone=float(np.concatenate(hits_bb).mean()) if labelled else None,
        accuracy_early_exit=float(hit_ee.mean()) if labelled else None,
        exit_rates={n: float(m.mean()) for n, m in by_exit.items()},
        exit_agreement={n: float(agree_all[m].mean()) if m.any() else float("nan") for n, m in by_exit.items()},
        exit_accuracy={n: (float(hit_ee[m].mean()) if m.any() else float("nan")) if labelled else None
                       for n, m in by_exit.items()},
        latency_ratio_b1=None, latency_ratio_b32=None, backbone_ms_b1=None, tolerance=ee.tolerance)
    if latency:
        inputs = torch.cat(kept_inputs)
        result.latency_ratio_b1, result.latency_ratio_nofire_b1, result.backbone_ms_b1 = _latency_ratios(
            ee, inputs, 1, latency_samples)
        result.latency_ratio_b32, result.latency_ratio_nofire_b32, _ = _latency_ratios(ee, inputs, 32, 8)
    return result
