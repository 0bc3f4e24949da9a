"""The report's figures (matplotlib, the optional ``report`` extra; imported only here).

Each function draws from the report dict as written to ``report.json`` (None for missing values), so
figures and numbers cannot disagree.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from selfxit.extras import require_extra

require_extra("report", "the report's figures")
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from selfxit.evaluate.report.compute import BUDGETS

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
    """One panel per head: hit rate, agreement and accuracy against the threshold on its exit score (the gate
    score for gated exits, else the calibrated confidence; SelfXit Fig. 2 style)."""
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
        ax.set(title=title, xlabel=f"{c.get('score', 'confidence')} threshold", xlim=(0, 1), ylim=(0, 1.02))
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
           xlim=(0, max(1.05, max(flops, default=0.0) + 0.02)), title=trade["family"])
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
