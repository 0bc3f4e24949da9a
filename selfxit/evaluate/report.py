"""The evaluation report: per-exit curves, the collaborative table, cost, latency, trade-off and calibration.

:func:`build_report` runs a bundle's early-exit model and its plain backbone over a held-back split and
writes ``index.html`` (static, offline: no scripts, images by relative path), PNG figures and the same
numbers in ``report.json``. The headline numbers are computed exactly as :func:`selfxit.evaluate.evaluation.evaluate`
computes them (same batches, same early-exit calls), so the two agree to the last bit.
"""
from __future__ import annotations

import copy
import datetime as _dt
import html
import io
import json
import math
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from selfxit.fit import select as optimize
from selfxit.evaluate.evaluation import cost_per_exit
from selfxit.core.runtime import FINAL, EarlyExitRunner, Exit

BATCH_SIZES = (1, 8, 32, 64, 128)
BUDGETS = (0.25, 0.5, 0.75, 1.0)
CURVE_POINTS = 100
ECE_BINS = 15
THRESHOLD_GRID = np.linspace(0.0, 1.0, 101)
FIGURES = {"exits": "exits.png", "tradeoff": "tradeoff.png", "latency": "latency.png",
           "calibration": "calibration.png"}

PEAK_MEMORY_METHOD = (
    "Live tensor bytes during one forward pass, tracked op by op with a torch dispatch mode: every storage an "
    "operator allocates is added when it appears and subtracted when the last tensor using it is garbage "
    "collected (weak-reference finalizers); views and in-place results of existing storages are not counted "
    "again. The input batch, the weights and the heads exist before the pass and are not counted; the output is. "
    "Scratch buffers allocated inside a kernel (e.g. oneDNN workspaces) are invisible to this method.")
LATENCY_METHOD = (
    "Wall time on CPU in inference mode, with the backbone and the early-exit model run on the same batches and "
    "alternated (backbone first on even batches, early exit first on odd ones) after one warm-up call each. "
    "Per-sample latency is the time from the start of a batch until that sample's answer is known: the batch "
    "time for the backbone; for the early-exit model the moment its exit fires (the per-sample callback), so "
    "samples that leave early are answered early. Time per sample (throughput) is batch time / batch size.")


# ---- recording the split -------------------------------------------------------------------------------

@contextmanager
def _head_outputs(backbone, heads: dict):
    """Forward hooks running every head (raw logits) on its layer's output; yields the dict they fill."""
    modules = dict(backbone.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name, head=head: store.__setitem__(name, head(out))) for name, head in heads.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], batch[1] if len(batch) > 1 else None


def _record(ee, loader, layers: list[str], pool_size: int, progress: bool) -> dict:
    """One pass over the split: backbone top-1, every head's raw and calibrated confidence, the cascade's answers."""
    heads = {name: ee.heads[name] for name in layers}
    temps = np.array([ee.temperatures[name] for name in layers])
    names = list(ee.thresholds) + ["final"]
    rec = {k: [] for k in ("reference", "labels", "exit", "prediction", "head_pred", "conf_raw", "conf_cal")}
    pool, kept = [], 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="report: predictions", disable=not progress):
            x, labels = _unpack(batch)
            with _head_outputs(ee.backbone, heads) as store:
                reference = ee.backbone(x).argmax(1)
            out = ee(x)
            logits = torch.stack([store[name] for name in layers])  # [K, B, C]
            raw = logits.softmax(2).max(2)
            rec["head_pred"].append(raw.indices.numpy())
            rec["conf_raw"].append(raw.values.numpy())
            scaled = logits / torch.as_tensor(temps, dtype=logits.dtype)[:, None, None]
            rec["conf_cal"].append(scaled.softmax(2).amax(2).numpy())
            rec["reference"].append(reference.numpy())
            rec["exit"].append(out.exit.numpy())
            rec["prediction"].append(out.predictions.numpy())
            if labels is not None:
                rec["labels"].append(labels.numpy())
            if kept < pool_size:
                pool.append(x[:pool_size - kept])
                kept += len(pool[-1])
    if not rec["reference"]:
        raise ValueError("nothing to report on: the split is empty")
    data = {k: np.concatenate(v, axis=-1) for k, v in rec.items() if v}
    exit_idx = data["exit"]
    data["position"] = np.where(exit_idx == FINAL, len(names) - 1, exit_idx)
    labelled = "labels" in data and len(data["labels"]) == len(exit_idx) and bool((data["labels"] >= 0).all())
    data["labels"] = data["labels"] if labelled else None
    data["pool"] = torch.cat(pool)
    return data


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _summary(ee, data: dict) -> dict:
    """Overall numbers, computed the way :func:`selfxit.evaluate.evaluation.evaluate` computes them."""
    names = list(ee.thresholds) + ["final"]
    position, labels = data["position"], data["labels"]
    agree = data["prediction"] == data["reference"]
    hit_ee = data["prediction"] == labels if labels is not None else None
    by_exit = {name: position == k for k, name in enumerate(names)}
    return {
        "num_samples": int(len(position)),
        "flops_fraction": float(cost_per_exit(ee)[position].mean() / ee.backbone_flops),
        "agreement": float(agree.mean()),
        "accuracy_backbone": float((data["reference"] == labels).mean()) if labels is not None else None,
        "accuracy_early_exit": float(hit_ee.mean()) if labels is not None else None,
        "exit_rates": {n: float(m.mean()) for n, m in by_exit.items()},
        "exit_agreement": {n: _mean(agree[m]) for n, m in by_exit.items()},
        "exit_accuracy": {n: _mean(hit_ee[m]) if labels is not None else None for n, m in by_exit.items()},
        "tolerance": ee.tolerance,
    }


# ---- 1. per-exit curves and 2. the collaborative table ---------------------------------------------------------

def _exit_cost_fraction(ee, layer: str) -> float:
    """FLOPs fraction of a sample answered at ``layer`` by that head alone."""
    remaining = {c.name: c.remaining_flops for c in ee.candidates}[layer]
    return (ee.backbone_flops - remaining + ee.head_flops[layer]) / ee.backbone_flops


def per_exit_curves(ee, data: dict, layers: list[str]) -> dict:
    """Per head, against the confidence threshold: hit rate, agreement and accuracy of the samples it answers."""
    curves = {}
    labels = data["labels"]
    for k, layer in enumerate(layers):
        conf = data["conf_cal"][k]
        hits = conf[None, :] >= THRESHOLD_GRID[:, None]  # [thresholds, N]
        count = hits.sum(1)
        agree = data["head_pred"][k] == data["reference"]

        def among_hits(flags):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(count > 0, (hits & flags).sum(1) / np.maximum(count, 1), np.nan).tolist()

        curves[layer] = {
            "active": layer in ee.thresholds,
            "threshold": ee.thresholds.get(layer),
            "temperature": float(ee.temperatures[layer]),
            "flops_fraction_at_exit": _exit_cost_fraction(ee, layer),
            "thresholds": THRESHOLD_GRID.tolist(),
            "hit_rate": (count / conf.size).tolist(),
            "agreement": among_hits(agree),
            "accuracy": among_hits(data["head_pred"][k] == labels) if labels is not None else None,
        }
    return curves


def collaborative_table(ee, data: dict, summary: dict) -> list[dict]:
    """Per active exit (and the backbone's 'final'): hit rate, agreement, accuracy and effect on final accuracy.

    The effect of an exit is (its correct answers - the backbone's correct answers on the same samples) / N,
    so the effects add up to early-exit accuracy minus backbone accuracy.
    """
    names = list(ee.thresholds) + ["final"]
    costs = cost_per_exit(ee) / ee.backbone_flops
    labels, position = data["labels"], data["position"]
    rows = []
    for k, name in enumerate(names):
        here = position == k
        row = {"exit": name, "threshold": ee.thresholds.get(name), "flops_fraction_at_exit": float(costs[k]),
               "hit_rate": summary["exit_rates"][name], "agreement": summary["exit_agreement"][name],
               "accuracy": summary["exit_accuracy"][name], "backbone_accuracy_same_samples": None,
               "accuracy_effect": None}
        if labels is not None:
            ee_correct = data["prediction"][here] == labels[here]
            bb_correct = data["reference"][here] == labels[here]
            row["backbone_accuracy_same_samples"] = _mean(bb_correct)
            row["accuracy_effect"] = float((ee_correct.sum() - bb_correct.sum()) / len(position))
        rows.append(row)
    return rows


# ---- 3. cost ------------------------------------------------------------------------------------------

def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _serialized_bytes(state_dict: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by operators while active, and their peak."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors holding it]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self._live[ptr]
                self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._live.get(ptr)
            if entry is None:
                if ptr in inputs:  # a view or in-place result of a storage that existed before
                    continue
                entry = self._live[ptr] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_live_bytes(fn, x: torch.Tensor) -> int:
    """Peak of live tensor bytes allocated while ``fn(x)`` runs (see :data:`PEAK_MEMORY_METHOD`)."""
    tracker = LiveTensorBytes()
    with torch.inference_mode(), tracker:
        out = fn(x)
    del out
    return tracker.peak


def _batch(pool: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """``size`` samples of ``pool`` from ``start`` on, wrapping around."""
    return pool[torch.arange(start, start + size) % len(pool)]


def cost_report(ee, summary: dict, pool: torch.Tensor, batch_sizes, bundle_dir=None, weights_path=None,
                progress: bool = True) -> dict:
    """FLOPs per sample, model size on disk and in memory, and peak live tensor memory per batch size."""
    active = list(ee.thresholds)
    disk = {"backbone_state_dict": _serialized_bytes(ee.backbone.state_dict()),
            "weights_file": Path(weights_path).stat().st_size if weights_path else None,
            "bundle_files": None, "bundle_total": None}
    if bundle_dir is not None:
        files = {p.name: p.stat().st_size for p in sorted(Path(bundle_dir).iterdir()) if p.is_file()}
        disk["bundle_files"], disk["bundle_total"] = files, sum(files.values())
    memory = {"backbone": _tensor_bytes(ee.backbone),
              "heads_all": sum(_tensor_bytes(h) for h in ee.heads.values()),
              "heads_active": sum(_tensor_bytes(ee.heads[name]) for name in active)}
    memory["early_exit_total"] = memory["backbone"] + memory["heads_active"]
    ee(pool[:1])  # builds the runtime (temperature-folded head copies) before anything is measured
    peaks = []
    for b in tqdm(batch_sizes, desc="report: peak memory", disable=not progress):
        x = _batch(pool, 0, b)
        peaks.append({"batch_size": b, "backbone": peak_live_bytes(ee.backbone, x),
                      "early_exit": peak_live_bytes(ee, x)})
    return {
        "flops": {"backbone_per_sample": ee.backbone_flops,
                  "early_exit_per_sample": summary["flops_fraction"] * ee.backbone_flops,
                  "fraction": summary["flops_fraction"],
                  "head_flops": {name: ee.head_flops[name] for name in ee.heads},
                  "active_head_flops": sum(ee.head_flops[name] for name in active)},
        "disk_bytes": disk, "memory_bytes": memory,
        "peak_live_bytes": {"method": PEAK_MEMORY_METHOD, "batches": peaks},
    }


# ---- 4. latency ---------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(run, x: torch.Tensor, device: str, per_sample: bool) -> tuple[float, np.ndarray]:
    """(batch seconds, per-sample seconds until each answer) of ``run(x, callback)``.

    Without ``per_sample`` the callback is None and every sample's answer counts at the end of the batch.
    """
    stamps = np.full(len(x), np.nan)
    callback = (lambda r: stamps.__setitem__(r.index, time.perf_counter())) if per_sample else None
    _sync(device)
    start = time.perf_counter()
    run(x, callback)
    _sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, np.where(np.isnan(stamps), elapsed, stamps - start)


def _stats(batch_seconds: list[float], sample_seconds: list[np.ndarray], batch: int) -> dict:
    ms = 1000 * np.concatenate(sample_seconds)
    return {"latency_mean_ms": float(ms.mean()), "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99)),
            "ms_per_sample": float(1000 * sum(batch_seconds) / (batch * len(batch_seconds)))}


def measure_latency(backbone_run, early_run, pool: torch.Tensor, batch_sizes, samples: int, device: str = "cpu",
                    progress: bool = True) -> list[dict]:
    """Backbone vs early exit per batch size, alternating the two on the same batches (see :data:`LATENCY_METHOD`).

    Each ``run(x, callback)``; ``early_run`` None times the backbone alone.
    """
    runs = {"backbone": backbone_run, **({"early_exit": early_run} if early_run is not None else {})}
    per_sample = device == "cpu"  # a callback per sample would force a device sync each time on GPU
    counts = {b: max(1, math.ceil(samples / b)) for b in batch_sizes}
    bar = tqdm(total=sum(b * n for b, n in counts.items()), desc=f"report: latency {device}", unit="img",
               disable=not progress)
    results = []
    for b, count in counts.items():
        bar.set_postfix(batch=b)
        times = {name: ([], []) for name in runs}
        with torch.inference_mode():
            x = _batch(pool, 0, b).to(device)
            for run in runs.values():  # warm-up
                run(x, None)
            for i in range(count):
                x = _batch(pool, i * b, b).to(device)
                for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    elapsed, each = _timed(runs[name], x, device, per_sample and name == "early_exit")
                    times[name][0].append(elapsed)
                    times[name][1].append(each)
                bar.update(b)
        row = {"batch_size": b, "batches": count, **{name: _stats(*t, b) for name, t in times.items()}}
        if "early_exit" in row:
            row["ratio_mean_latency"] = row["early_exit"]["latency_mean_ms"] / row["backbone"]["latency_mean_ms"]
            row["ratio_ms_per_sample"] = row["early_exit"]["ms_per_sample"] / row["backbone"]["ms_per_sample"]
        results.append(row)
    bar.close()
    return results


def _cuda_latency(ee, pool: torch.Tensor, batch_sizes, samples: int, progress: bool) -> dict:
    """GPU latency on copies of the backbone and heads; the backbone alone if the early-exit runtime fails there."""
    backbone = copy.deepcopy(ee.backbone).cuda().eval()
    exits = [Exit(e.layer, copy.deepcopy(e.head).cuda().eval(), e.temperature, e.threshold,
                  copy.deepcopy(e.gate).cuda().eval() if e.gate is not None else None) for e in ee.exits]
    runner = EarlyExitRunner(backbone, exits, ee.num_classes)
    result = {"device": torch.cuda.get_device_name(), "error": None}
    early = lambda x, cb: runner(x)  # noqa: E731
    try:
        with torch.inference_mode():
            runner(_batch(pool, 0, 2).cuda())
    except Exception as exc:  # noqa: BLE001 - report why, and still time the backbone
        result["error"], early = f"early exit on GPU failed: {type(exc).__name__}: {exc}", None
    result["batches"] = measure_latency(lambda x, cb: backbone(x), early, pool, batch_sizes, samples, "cuda",
                                        progress)
    return result


def latency_report(ee, pool: torch.Tensor, batch_sizes, samples: int, progress: bool = True) -> dict:
    """CPU latency (and GPU when CUDA is available) of the early-exit model against its backbone."""
    return {"method": LATENCY_METHOD, "threads": torch.get_num_threads(),
            "cpu": measure_latency(lambda x, cb: ee.backbone(x), lambda x, cb: ee(x, callback=cb), pool,
                                   batch_sizes, samples, "cpu", progress),
            "cuda": _cuda_latency(ee, pool, batch_sizes, samples, progress) if torch.cuda.is_available() else None}


# ---- 5. trade-off curve and budgets ---------------------------------------------------------------------

def _exit_stats(ee, data: dict, layers: list[str]) -> optimize.ExitStats:
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    return optimize.ExitStats(data["conf_cal"], data["head_pred"] == data["reference"][None, :],
                              [ee.head_flops[n] for n in layers], [remaining[n] for n in layers], ee.backbone_flops)


def _curve_scales(confidence: np.ndarray, shape: np.ndarray, points: int) -> np.ndarray:
    """``points`` scales s for thresholds ``1 - s (1 - shape)``: 0, then quantiles of the scale at which each
    sample first leaves somewhere, so the points spread evenly over the share of samples answered early."""
    active = np.isfinite(shape)
    slack = np.maximum(1.0 - shape[active], 1e-12)[:, None]
    first = ((1.0 - confidence[active]) / slack).min(0)
    return np.concatenate([[0.0], np.quantile(first, np.linspace(0.0, 1.0, points - 1)) * (1 + 1e-9)])


def tradeoff_curve(ee, data: dict, layers: list[str], points: int = CURVE_POINTS) -> dict:
    """Agreement and accuracy against mean FLOPs for the scaled family of the bundle's cascade.

    With no active exit in the bundle, the family is every head at the same threshold ``1 - s``.
    """
    stats = _exit_stats(ee, data, layers)
    shape = np.array([ee.thresholds.get(n, optimize.OFF) for n in layers], dtype=np.float64)
    family = "bundle cascade, thresholds 1 - s (1 - t)"
    if not np.isfinite(shape).any():
        shape, family = np.zeros(len(layers)), "all heads, one threshold 1 - s"
    labels, n, active = data["labels"], stats.confidence.shape[1], np.isfinite(shape)
    curve = []
    for s in _curve_scales(stats.confidence, shape, points):
        thresholds = np.full(len(layers), optimize.OFF)
        thresholds[active] = 1.0 - s * (1.0 - shape[active])
        result = optimize.evaluate_cascade(stats, thresholds)
        taken = optimize.exit_assignment(stats, thresholds)
        final = np.where(taken >= 0, data["head_pred"][np.maximum(taken, 0), np.arange(n)], data["reference"])
        curve.append({"scale": float(s), "flops_fraction": result.flops_fraction, "agreement": 1.0 - result.drop,
                      "accuracy": float((final == labels).mean()) if labels is not None else None,
                      "early_rate": float((taken >= 0).mean())})
    return {"family": family, "exits": [n for n, t in zip(layers, shape) if np.isfinite(t)], "points": curve}


def budget_table(curve: list[dict], summary: dict, budgets=BUDGETS) -> list[dict]:
    """Best accuracy (else agreement) reachable within each FLOPs budget, over the curve and the plain backbone."""
    key = "accuracy" if summary["accuracy_backbone"] is not None else "agreement"
    backbone = {"scale": None, "flops_fraction": 1.0, "agreement": 1.0, "accuracy": summary["accuracy_backbone"],
                "setting": "backbone"}
    rows = []
    for budget in budgets:
        within = [dict(p, setting="curve") for p in curve if p["flops_fraction"] <= budget + 1e-12]
        if budget >= 1.0:
            within.append(backbone)
        best = max(within, key=lambda p: (p[key], -p["flops_fraction"])) if within else None
        fields = ("setting", "scale", "flops_fraction", "agreement", "accuracy")
        rows.append({"budget": budget, "ranked_by": key, **{k: best[k] if best else None for k in fields}})
    return rows


# ---- 6. calibration -----------------------------------------------------------------------------------

def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Equal-width confidence bins (as :func:`selfxit.fit.calibrate.expected_calibration_error`): ECE and per-bin stats."""
    edges = torch.linspace(0, 1, bins + 1).numpy()
    confidence = confidence.astype(np.float32)
    counts, mean_conf, mean_correct, ece = [], [], [], 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        counts.append(int(in_bin.sum()))
        mean_conf.append(_mean(confidence[in_bin].astype(np.float64)))
        mean_correct.append(_mean(correct[in_bin].astype(np.float64)))
        if in_bin.any():
            ece += in_bin.mean() * abs(mean_conf[-1] - mean_correct[-1])
    return {"ece": float(ece), "edges": edges.astype(np.float64).tolist(), "count": counts,
            "confidence": mean_conf, "agreement": mean_correct}


def calibration_report(ee, data: dict, layers: list[str]) -> dict:
    """Per head: ECE against agreement with the backbone before (logits) and after temperature scaling (logits / T)."""
    out = {}
    for k, layer in enumerate(layers):
        agree = data["head_pred"][k] == data["reference"]
        before, after = reliability(data["conf_raw"][k], agree), reliability(data["conf_cal"][k], agree)
        out[layer] = {"temperature": float(ee.temperatures[layer]), "ece_before": before["ece"],
                      "ece_after": after["ece"], "before": before, "after": after}
    return out


# ---- figures --------------------------------------------------------------------------------------------

def _figure(panels: int, ncols: int, size=(4.2, 3.2)) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _values(values) -> np.ndarray:
    """A list with None for missing values (as in report.json) as a float array with NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_exits(curves: dict, path: Path) -> None:
    """One panel per head: hit rate, agreement and accuracy against the confidence threshold (SelfXit Fig. 2 style)."""
    fig, axes = _figure(len(curves), 3)
    for ax, (layer, c) in zip(axes, curves.items()):
        ax.plot(c["thresholds"], c["hit_rate"], label="hit rate", color="tab:blue")
        ax.plot(c["thresholds"], _values(c["agreement"]), label="agreement", color="tab:orange")
        if c["accuracy"] is not None:
            ax.plot(c["thresholds"], _values(c["accuracy"]), label="accuracy (labels)", color="tab:green",
                    linestyle="--")
        title = f"{layer}  ({c['flops_fraction_at_exit']:.0%} FLOPs)"
        if c["active"]:
            ax.axvline(c["threshold"], color="black", linestyle=":", linewidth=1, label="chosen threshold")
            title += f"\nactive, threshold {c['threshold']:.3f}"
        else:
            title += "\nnot active"
        ax.set(title=title, xlabel="confidence threshold", xlim=(0, 1), ylim=(0, 1.02))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=100)


def plot_tradeoff(trade: dict, summary: dict, path: Path) -> None:
    """Agreement and accuracy against mean FLOPs for the threshold family, with the bundle's own point."""
    fig, (ax,) = _figure(1, 1, (7.0, 4.5))
    pts = trade["points"]
    flops = [p["flops_fraction"] for p in pts]
    ax.plot(flops, [p["agreement"] for p in pts], ".-", color="tab:orange", label="agreement with backbone")
    if summary["accuracy_backbone"] is not None:
        ax.plot(flops, [p["accuracy"] for p in pts], ".-", color="tab:green", label="accuracy (labels)")
        ax.axhline(summary["accuracy_backbone"], color="tab:green", linestyle=":", linewidth=1,
                   label="backbone accuracy")
        ax.plot([summary["flops_fraction"]], [summary["accuracy_early_exit"]], "*", color="tab:green", markersize=14,
                markeredgecolor="black")
    ax.plot([summary["flops_fraction"]], [summary["agreement"]], "*", color="tab:orange", markersize=14,
            markeredgecolor="black", label="bundle's cascade (measured)")
    for b in BUDGETS:
        ax.axvline(b, color="grey", linewidth=0.8, alpha=0.5)
    ax.set(xlabel="mean FLOPs per sample / backbone FLOPs", ylabel="fraction of samples",
           xlim=(0, max(1.05, max(flops) + 0.02)), title=trade["family"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)


def plot_latency(latency: dict, path: Path) -> None:
    """CPU per-sample latency (p50 with p99 marks) and time per sample, backbone vs early exit, per batch size."""
    rows = latency["cpu"]
    sizes = [r["batch_size"] for r in rows]
    fig, (left, right) = _figure(2, 2)
    for which, color in (("backbone", "tab:grey"), ("early_exit", "tab:blue")):
        label = which.replace("_", "-")
        left.plot(sizes, [r[which]["latency_p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
        left.plot(sizes, [r[which]["latency_p99_ms"] for r in rows], "v:", color=color, label=f"{label} p99")
        right.plot(sizes, [r[which]["ms_per_sample"] for r in rows], "o-", color=color, label=label)
    left.set(title="latency until a sample's answer (CPU)", ylabel="ms")
    right.set(title="time per sample = batch time / batch size (CPU)", ylabel="ms per sample")
    for ax in (left, right):
        ax.set(xlabel="batch size", xscale="log", yscale="log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(10)
    fig.savefig(path, dpi=100)


def plot_calibration(calibration: dict, path: Path) -> None:
    """Reliability diagrams per head: agreement with the backbone per confidence bin, before and after T."""
    fig, axes = _figure(len(calibration), 3, (3.8, 3.6))
    for ax, (layer, c) in zip(axes, calibration.items()):
        edges = np.array(c["before"]["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        scaled = dict(color="tab:blue", alpha=0.55, label=f"logits / T (T={c['temperature']:.2f})")
        raw = dict(color="none", edgecolor="tab:red", linewidth=1.2, label="logits")
        for key, style in (("after", scaled), ("before", raw)):
            agreement = np.nan_to_num(_values(c[key]["agreement"]), nan=0.0)
            ax.bar(centres, agreement, width=width, **style)
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle="--")
        ax.set(title=f"{layer}\nECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}", xlabel="confidence",
               ylabel="agreement with backbone", xlim=(0, 1), ylim=(0, 1))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=100)


# ---- HTML ------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if percent:
        return f"{100 * value:.{max(digits - 2, 1)}f}%"
    if isinstance(value, int):
        return f"{value:,d}"
    return f"{value:.{digits}f}"


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


_CSS = """body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.note{color:#555;font-size:.92em;max-width:60em}code{background:#f3f3f3;padding:0 .2em}"""


def render_html(report: dict) -> str:
    """The static HTML page for a report dict (figures referenced by relative path)."""
    s, info, figs = report["summary"], report["info"], report["figures"]
    labelled = s["accuracy_backbone"] is not None
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>selfxit report</title><style>{_CSS}</style>"
             "</head><body><h1>selfxit evaluation report</h1>",
             _table(["setting", "value"], [[k, "-" if v is None else v] for k, v in info.items()])]

    lat = {r["batch_size"]: r for r in report["latency"]["cpu"]}
    first = lat[min(lat)]
    parts.append("<h2>Summary</h2>" + _table(
        ["", "backbone", "early exit"],
        [["accuracy (labels)", _fmt(s["accuracy_backbone"], 4), _fmt(s["accuracy_early_exit"], 4)],
         ["agreement with backbone", "1.0000", _fmt(s["agreement"], 4)],
         ["mean FLOPs per sample", _fmt(report["cost"]["flops"]["backbone_per_sample"]),
          f"{report['cost']['flops']['early_exit_per_sample']:,.0f} ({s['flops_fraction']:.1%})"],
         [f"CPU mean latency, batch {first['batch_size']} (ms)", _fmt(first["backbone"]["latency_mean_ms"], 2),
          _fmt(first["early_exit"]["latency_mean_ms"], 2)]]))

    parts.append("<h2>1. Each exit on its own</h2><p class='note'>Every head in the bundle, on the "
                 f"{html.escape(str(info['split']))} split: of the samples whose calibrated confidence reaches the "
                 "threshold (hit rate), the share that agree with the backbone and, with labels, the share that are "
                 "right. Each head sees every sample here, as if it were the only exit.</p>"
                 + _img(figs["exits"], "per-exit curves"))

    rows = [[r["exit"], _fmt(r["threshold"], 4), _fmt(r["flops_fraction_at_exit"], 3, True),
             _fmt(r["hit_rate"], 3, True), _fmt(r["agreement"], 4), _fmt(r["accuracy"], 4),
             _fmt(r["backbone_accuracy_same_samples"], 4),
             "-" if r["accuracy_effect"] is None else f"{100 * r['accuracy_effect']:+.2f} pts"]
            for r in report["collaborative"]]
    parts.append("<h2>2. Exits together (the cascade)</h2><p class='note'>Per active exit: the share of samples "
                 "answered there, their agreement and accuracy, the backbone's accuracy on the same samples, and the "
                 "exit's effect on the final accuracy (its correct answers minus the backbone's on those samples, "
                 "over all samples; the effects add up to the accuracy difference).</p>"
                 + _table(["exit", "threshold", "FLOPs at exit", "hit rate", "agreement", "accuracy",
                           "backbone accuracy there", "effect on final accuracy"], rows)
                 + (f"<p>Final accuracy: backbone <b>{s['accuracy_backbone']:.4f}</b>, early exit "
                    f"<b>{s['accuracy_early_exit']:.4f}</b> "
                    f"({100 * (s['accuracy_early_exit'] - s['accuracy_backbone']):+.2f} pts).</p>" if labelled else
                    "<p>The folder has no labels: accuracy is not available.</p>"))

    cost = report["cost"]
    disk, mem = cost["disk_bytes"], cost["memory_bytes"]
    bundle = disk["bundle_files"] or {}
    parts.append("<h2>3. Cost</h2>" + _table(
        ["", "backbone", "early exit"],
        [["mean FLOPs per sample", _fmt(cost["flops"]["backbone_per_sample"]),
          f"{cost['flops']['early_exit_per_sample']:,.0f} (incl. heads)"],
         ["on disk", f"{_bytes(disk['backbone_state_dict'])} (state dict)"
          + (f", weights file {_bytes(disk['weights_file'])}" if disk["weights_file"] else ""),
          f"+ bundle {_bytes(disk['bundle_total'])} (" + ", ".join(f"{k} {_bytes(v)}" for k, v in bundle.items()) + ")"
          if disk["bundle_total"] is not None else "-"],
         ["in memory (parameters + buffers)", _bytes(mem["backbone"]),
          f"{_bytes(mem['early_exit_total'])} (active heads {_bytes(mem['heads_active'])}; "
          f"all heads {_bytes(mem['heads_all'])})"]]))
    parts.append("<h3>Peak live tensor memory during inference</h3>" + _table(
        ["batch size", "backbone", "early exit", "ratio"],
        [[p["batch_size"], _bytes(p["backbone"]), _bytes(p["early_exit"]), _fmt(p["early_exit"] / p["backbone"])]
         for p in cost["peak_live_bytes"]["batches"]])
        + f"<p class='note'>{html.escape(cost['peak_live_bytes']['method'])}</p>")

    latency = report["latency"]

    def latency_rows(rows):
        keys = ("latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "ms_per_sample")
        return [[r["batch_size"], r["batches"],
                 *[_fmt(r[w][k], 3) if w in r else "-" for w in ("backbone", "early_exit") for k in keys],
                 _fmt(r.get("ratio_mean_latency")), _fmt(r.get("ratio_ms_per_sample"))] for r in rows]

    header = ["batch", "batches", *[f"{w} {k}" for w in ("backbone", "early exit")
                                    for k in ("mean ms", "p50 ms", "p99 ms", "ms/sample")],
              "ratio mean latency", "ratio ms/sample"]
    parts.append(f"<h2>4. Latency</h2><h3>CPU ({latency['threads']} threads)</h3>"
                 + _table(header, latency_rows(latency["cpu"]))
                 + _img(figs["latency"], "latency") + f"<p class='note'>{html.escape(latency['method'])}</p>")
    cuda = latency["cuda"]
    if cuda is None:
        parts.append("<p class='note'>No CUDA device: GPU latency not measured.</p>")
    else:
        error = f"<p>{html.escape(cuda['error'])}: backbone only.</p>" if cuda["error"] else ""
        parts.append(f"<h3>GPU ({html.escape(cuda['device'])})</h3>{error}<p class='note'>Per-sample latency is the "
                     "batch time on GPU (no per-sample callbacks).</p>" + _table(header, latency_rows(cuda["batches"])))

    trade = report["tradeoff"]
    parts.append(f"<h2>5. Trade-off</h2><p class='note'>{len(trade['points'])} threshold settings of the family "
                 f"<i>{html.escape(trade['family'])}</i> on exits {html.escape(', '.join(trade['exits']))}, "
                 "evaluated on "
                 "the recorded predictions of the split; the stars are the bundle's cascade as measured by the "
                 "runtime. Budget table: the best accuracy (or agreement without labels) of any setting, or the plain "
                 "backbone, whose mean FLOPs stay within the budget (the protocol of <i>How to Train Your Multi-Exit "
                 "Model?</i>).</p>" + _img(figs["tradeoff"], "trade-off curve") + _table(
                     ["FLOPs budget", "setting", "scale s", "mean FLOPs", "agreement", "accuracy"],
                     [[f"{b['budget']:.0%}", b["setting"] or "none fits", _fmt(b["scale"], 3),
                       _fmt(b["flops_fraction"], 3, True), _fmt(b["agreement"], 4), _fmt(b["accuracy"], 4)]
                      for b in report["budgets"]]))

    cal = report["calibration"]
    parts.append("<h2>6. Calibration</h2><p class='note'>Expected calibration error (15 equal-width bins) of each "
                 "head's max-softmax confidence against agreement with the backbone, on this split, before (logits) "
                 "and after temperature scaling (logits / T, T fitted on the tune split).</p>"
                 + _table(["head", "temperature", "ECE before", "ECE after"],
                          [[k, _fmt(c["temperature"]), _fmt(c["ece_before"], 4), _fmt(c["ece_after"], 4)]
                           for k, c in cal.items()])
                 + _img(figs["calibration"], "reliability diagrams"))
    parts.append("<p class='note'>All numbers are also in <code>report.json</code>.</p></body></html>")
    return "\n".join(parts)


# ---- entry point ------------------------------------------------------------------------------------------

def _jsonable(value):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(ee, dataset, rows, out_dir, latency_samples: int = 256, batch_sizes=BATCH_SIZES,
                 bundle_dir=None, weights_path=None, info: dict | None = None, batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True) -> dict:
    """Measure ``ee`` on ``dataset`` rows ``rows`` (None: all) and write ``index.html``, PNGs and ``report.json``.

    ``dataset`` yields ``x`` or ``(x, label, ...)``; labels < 0 mean unlabelled. Batches of ``batch_size`` in
    order, as :func:`selfxit.evaluate.evaluation.evaluate` gets them from the CLI. ``latency_samples`` bounds the samples
    timed per batch size (at least one batch each). Returns the report dict written to ``report.json``.
    """
    if latency_samples < 1:
        raise ValueError(f"latency_samples must be >= 1; got {latency_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subset = dataset if rows is None else torch.utils.data.Subset(dataset, [int(r) for r in rows])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    layers = [c.name for c in ee.candidates if c.name in ee.heads]
    batch_sizes = [int(b) for b in batch_sizes]
    data = _record(ee, loader, layers, max(latency_samples, max(batch_sizes)), progress)
    summary = _summary(ee, data)
    curves = per_exit_curves(ee, data, layers)
    trade = tradeoff_curve(ee, data, layers)
    report = {
        "info": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 **(info or {}), "samples": summary["num_samples"],
                 "labelled": summary["accuracy_backbone"] is not None,
                 "tolerance": ee.tolerance, "active exits": ", ".join(ee.thresholds) or "none",
                 "heads in bundle": len(layers)},
        "summary": summary,
        "per_exit": curves,
        "collaborative": collaborative_table(ee, data, summary),
        "cost": cost_report(ee, summary, data["pool"], batch_sizes, bundle_dir, weights_path, progress),
        "latency": latency_report(ee, data["pool"], batch_sizes, latency_samples, progress),
        "tradeoff": trade,
        "budgets": budget_table(trade["points"], summary),
        "calibration": calibration_report(ee, data, layers),
        "figures": dict(FIGURES),
    }
    report["info"].setdefault("split", "given rows" if rows is not None else "all")
    report = _jsonable(report)
    plot_exits(report["per_exit"], out_dir / FIGURES["exits"])
    plot_tradeoff(report["tradeoff"], report["summary"], out_dir / FIGURES["tradeoff"])
    plot_latency(report["latency"], out_dir / FIGURES["latency"])
    plot_calibration(report["calibration"], out_dir / FIGURES["calibration"])
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "index.html").write_text(render_html(report))
    return report
