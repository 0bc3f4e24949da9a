"""The evaluation report: per-exit curves, the collaborative table, cost, latency, trade-off and calibration.

:func:`build_report` runs a bundle's early-exit model and its plain backbone over a held-back split and
writes ``index.html`` (static, offline: no scripts, images by relative path), PNG figures and the same
numbers in ``report.json``. The headline numbers are computed exactly as
:func:`selfxit.evaluate.evaluation.evaluate` computes them (same batches, same early-exit calls), so the
two agree to the last bit.

Modules: :mod:`.compute` (numbers from one recorded pass), :mod:`.measure` (cost and latency, running
the models again), :mod:`.plots` (matplotlib, the optional ``report`` extra) and :mod:`.html` (the page).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from selfxit.evaluate.report.compute import (
    BUDGETS,
    CURVE_POINTS,
    ECE_BINS,
    THRESHOLD_GRID,
    budget_table,
    calibration_report,
    collaborative_table,
    jsonable,
    per_exit_curves,
    record,
    reliability,
    summary,
    tradeoff_curve,
)
from selfxit.evaluate.report.html import render_html
from selfxit.evaluate.report.measure import (
    LATENCY_METHOD,
    PEAK_MEMORY_METHOD,
    LiveTensorBytes,
    cost_report,
    latency_report,
    measure_latency,
    peak_live_bytes,
)

BATCH_SIZES = (1, 8, 32, 64, 128)
FIGURES = {"exits": "exits.png", "tradeoff": "tradeoff.png", "latency": "latency.png",
           "calibration": "calibration.png"}

__all__ = ["build_report", "BATCH_SIZES", "BUDGETS", "CURVE_POINTS", "ECE_BINS", "FIGURES", "THRESHOLD_GRID",
           "LATENCY_METHOD", "PEAK_MEMORY_METHOD", "LiveTensorBytes", "budget_table", "calibration_report",
           "collaborative_table", "cost_report", "latency_report", "measure_latency", "peak_live_bytes",
           "per_exit_curves", "reliability", "render_html", "summary", "tradeoff_curve", "write_figures"]


def write_figures(report: dict, out_dir: Path) -> None:
    """Draw the four PNGs of a report dict into ``out_dir`` (matplotlib is imported only now: optional extra)."""
    from selfxit.evaluate.report import plots
    plots.plot_exits(report["per_exit"], out_dir / FIGURES["exits"])
    plots.plot_tradeoff(report["tradeoff"], report["summary"], out_dir / FIGURES["tradeoff"])
    plots.plot_latency(report["latency"], out_dir / FIGURES["latency"])
    plots.plot_calibration(report["calibration"], out_dir / FIGURES["calibration"])


def build_report(ee, dataset, rows, out_dir, latency_samples: int = 256, batch_sizes=BATCH_SIZES,
                 bundle_dir=None, weights_path=None, info: dict | None = None, batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True) -> dict:
    """Measure ``ee`` on ``dataset`` rows ``rows`` (None: all) and write ``index.html``, PNGs and ``report.json``.

    ``dataset`` yields ``x`` or ``(x, label, ...)``; labels < 0 mean unlabelled. Batches of ``batch_size`` in
    order, as :func:`selfxit.evaluate.evaluation.evaluate` gets them from the CLI. ``latency_samples`` bounds the
    samples timed per batch size (at least one batch each). Returns the report dict written to ``report.json``.
    """
    if latency_samples < 1:
        raise ValueError(f"latency_samples must be >= 1; got {latency_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subset = dataset if rows is None else torch.utils.data.Subset(dataset, [int(r) for r in rows])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    layers = [c.name for c in ee.candidates if c.name in ee.heads]
    batch_sizes = [int(b) for b in batch_sizes]
    data = record(ee, loader, layers, max(latency_samples, max(batch_sizes)), progress)
    totals = summary(ee, data)
    trade = tradeoff_curve(ee, data, layers)
    report = {
        "info": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 **(info or {}), "samples": totals["num_samples"],
                 "labelled": totals["accuracy_backbone"] is not None,
                 "tolerance": ee.tolerance, "exit rule": _exit_rule(ee),
                 "active exits": ", ".join(ee.thresholds) or "none", "heads in bundle": len(layers)},
        "summary": totals,
        "per_exit": per_exit_curves(ee, data, layers),
        "collaborative": collaborative_table(ee, data, totals),
        "cost": cost_report(ee, totals, data["pool"], batch_sizes, bundle_dir, weights_path, progress),
        "latency": latency_report(ee, data["pool"], batch_sizes, latency_samples, progress),
        "tradeoff": trade,
        "budgets": budget_table(trade["points"], totals),
        "calibration": calibration_report(ee, data, layers),
        "figures": dict(FIGURES),
    }
    report["info"].setdefault("split", "given rows" if rows is not None else "all")
    report = jsonable(report)
    write_figures(report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "index.html").write_text(render_html(report))
    return report


def _exit_rule(ee) -> str:
    return "learned gates (threshold on the gate score)" if ee.gate == "learned" else \
        "calibrated max-softmax confidence"
