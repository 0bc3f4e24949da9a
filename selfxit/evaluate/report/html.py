"""The report's static HTML page: tables and figures by relative path, no scripts, nothing fetched."""
from __future__ import annotations

import html
import math

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

    gated = any(c.get("score") == "gate" for c in report["per_exit"].values())
    score = ("score reaches the threshold: the learned gate's output for gated exits (the bundle's exit rule; "
             "a gate that reads the previous exit reads the one before it in the gates' chain), the calibrated "
             "confidence for heads without a gate" if gated else "calibrated confidence reaches the threshold")
    parts.append("<h2>1. Each exit on its own</h2><p class='note'>Every head in the bundle, on the "
                 f"{html.escape(str(info['split']))} split: of the samples whose {score} (hit rate), the share that "
                 "agree with the backbone and, with labels, the share that are right. Each head sees every sample "
                 "here, as if it were the only exit" + ("; its FLOPs include its gate" if gated else "") + ".</p>"
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
          f"{cost['flops']['early_exit_per_sample']:,.0f} (incl. heads" + (" and gates)" if gated else ")")],
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
                 "evaluated on the recorded predictions of the split (FLOPs include heads and gates); the stars "
                 "are the bundle's cascade as measured by the runtime. The bundle's own thresholds on the recorded "
                 f"predictions give {_fmt(trade['bundle']['flops_fraction'], 3, True)} of the FLOPs at agreement "
                 f"{_fmt(trade['bundle']['agreement'], 4)}, the same cascade. Budget table: the best accuracy (or "
                 "agreement without labels) of any setting, or the plain backbone, whose mean FLOPs stay within the "
                 "budget (the protocol of <i>How to Train Your Multi-Exit "
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
