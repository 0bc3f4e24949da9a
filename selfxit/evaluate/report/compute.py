"""The report's numbers from one recorded pass over the split: summary, per-exit curves, the cascade table,
the trade-off curve with its budget table, and calibration.

:func:`record` runs the backbone (capturing every head's layer) and the early-exit model once per batch;
everything else here works on what it recorded, without running a model again.

What an exit's threshold applies to is the bundle's rule: the calibrated max-softmax, or, for bundles
fitted with ``gate="learned"``, the gate's score (computed as :mod:`selfxit.core.runtime` computes it),
and a gated exit costs its head's FLOPs plus its gate's. Curves and the trade-off use the same rule and
costs, so at the bundle's own thresholds they give what the runtime measures.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from selfxit.core.cascade import head_outputs
from selfxit.core.hooks import capture, split_batch
from selfxit.core.runtime import FINAL
from selfxit.evaluate.evaluation import cost_per_exit
from selfxit.fit import select as optimize
from selfxit.fit.calibrate import expected_calibration_error

BUDGETS = (0.25, 0.5, 0.75, 1.0)
CURVE_POINTS = 100
ECE_BINS = 15
THRESHOLD_GRID = np.linspace(0.0, 1.0, 101)


# ---- recording the split -------------------------------------------------------------------------------

def record(ee, loader, layers: list[str], pool_size: int, progress: bool) -> dict:
    """One pass over the split: backbone top-1, every head's raw and calibrated confidence, the cascade's answers.

    Also keeps the first ``pool_size`` inputs (``data["pool"]``) for the cost and latency measurements.
    """
    temps = np.array([ee.temperatures[name] for name in layers])
    names = list(ee.thresholds) + ["final"]
    gated, active = gated_exits(ee), list(ee.thresholds)
    rec = {k: [] for k in ("reference", "labels", "exit", "prediction", "head_pred", "conf_raw", "conf_cal")}
    if gated:
        rec.update(gate_chain=[], gate_active=[])
    pool, kept = [], 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="report: predictions", disable=not progress):
            x, labels = split_batch(batch)
            with capture(ee.backbone, layers) as acts:
                reference = ee.backbone(x).argmax(1)
            out = ee(x)  # after the capture: its hooks must not see the runtime's shrunk batches
            logits = head_outputs([ee.heads[n] for n in layers], [acts[n] for n in layers]) if layers \
                else torch.zeros(0, len(x), ee.num_classes)  # [K, B, C]
            raw = logits.softmax(2).max(2)
            rec["head_pred"].append(raw.indices.numpy())
            rec["conf_raw"].append(raw.values.numpy())
            scaled = logits / torch.as_tensor(temps, dtype=logits.dtype)[:, None, None]
            rec["conf_cal"].append(scaled.softmax(2).amax(2).numpy())
            if gated:
                by_layer = dict(zip(layers, scaled))
                rec["gate_chain"].append(gate_scores(ee, gated, by_layer))
                rec["gate_active"].append(gate_scores(ee, active, by_layer) if active else np.zeros((0, len(x))))
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


def gated_exits(ee) -> list[str]:
    """The layers with a learned gate, in forward order (the chain the gates were fitted on); [] when the
    bundle's thresholds apply to the max-softmax."""
    return list(ee.gates) if ee.gate == "learned" else []


def gate_scores(ee, names: list[str], scaled: dict[str, torch.Tensor]) -> np.ndarray:
    """[len(names), B] gate scores of the exits ``names`` run as one cascade, as the runtime computes them:
    each gate reads its exit's temperature-scaled logits and the previous exit's probabilities."""
    previous, out = None, []
    for name in names:
        out.append(ee.gates[name](scaled[name], previous).numpy())
        previous = scaled[name].softmax(1)
    return np.stack(out)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def summary(ee, data: dict) -> dict:
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

def _exit_flops(ee, layer: str) -> float:
    """FLOPs of running the exit at ``layer``: its head, and its gate when the bundle's rule is learned gates."""
    gate = ee.gates.get(layer) if ee.gate == "learned" else None
    return ee.head_flops[layer] + (gate.flops() if gate is not None else 0)


def _exit_cost_fraction(ee, layer: str) -> float:
    """FLOPs fraction of a sample answered at ``layer`` by that exit alone."""
    remaining = {c.name: c.remaining_flops for c in ee.candidates}[layer]
    return (ee.backbone_flops - remaining + _exit_flops(ee, layer)) / ee.backbone_flops


def per_exit_curves(ee, data: dict, layers: list[str]) -> dict:
    """Per head, against a threshold on its exit score: hit rate, agreement and accuracy of the samples it answers.

    The score is what the bundle's thresholds apply to: the gate's output for gated exits (each gate reading
    the previous exit of the chain the gates were fitted on), the calibrated max-softmax otherwise.
    """
    curves = {}
    labels = data["labels"]
    gated = gated_exits(ee)
    for k, layer in enumerate(layers):
        conf = data["gate_chain"][gated.index(layer)] if layer in gated else data["conf_cal"][k]
        hits = conf[None, :] >= THRESHOLD_GRID[:, None]  # [thresholds, N]
        count = hits.sum(1)
        agree = data["head_pred"][k] == data["reference"]

        def among_hits(flags, hits=hits, count=count):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(count > 0, (hits & flags).sum(1) / np.maximum(count, 1), np.nan).tolist()

        curves[layer] = {
            "active": layer in ee.thresholds,
            "score": "gate" if layer in gated else "confidence",
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


# ---- 5. trade-off curve and budgets ---------------------------------------------------------------------

def _family(ee, data: dict, layers: list[str]) -> tuple[list[str], optimize.ExitStats, np.ndarray, str]:
    """(exits, their ExitStats under the bundle's rule, the family's shape, its description) of the trade-off.

    The family scales the bundle's active exits; without active exits it is every gated exit (learned gates)
    or every head (max-softmax) at one threshold. Scores and costs follow the bundle's rule (see module doc).
    """
    gated, active = gated_exits(ee), list(ee.thresholds)
    if gated and active:
        names, scores, rule = active, data["gate_active"], "gate score"
    elif gated:
        names, scores, rule = gated, data["gate_chain"], "gate score"
    else:
        names, scores = active or layers, data["conf_cal"][[layers.index(n) for n in active or layers]]
        rule = "max-softmax" if ee.gate != "learned" else "max-softmax (not this bundle's rule: it has no gates)"
    remaining = {c.name: c.remaining_flops for c in ee.candidates}
    agree = data["head_pred"][[layers.index(n) for n in names]] == data["reference"][None, :]
    stats = optimize.ExitStats(scores, agree, [_exit_flops(ee, n) for n in names], [remaining[n] for n in names],
                               ee.backbone_flops)
    if active:
        shape = np.array([ee.thresholds[n] for n in names], dtype=np.float64)
        family = f"bundle cascade, {rule} thresholds 1 - s (1 - t)"
    else:
        shape = np.zeros(len(names))
        family = f"all {'gated exits' if gated else 'heads'}, one {rule} threshold 1 - s"
    return names, stats, shape, family


def _curve_scales(confidence: np.ndarray, shape: np.ndarray, points: int) -> np.ndarray:
    """``points`` scales s for thresholds ``1 - s (1 - shape)``: 0, then quantiles of the scale at which each
    sample first leaves somewhere, so the points spread evenly over the share of samples answered early."""
    active = np.isfinite(shape)
    slack = np.maximum(1.0 - shape[active], 1e-12)[:, None]
    first = ((1.0 - confidence[active]) / slack).min(0)
    return np.concatenate([[0.0], np.quantile(first, np.linspace(0.0, 1.0, points - 1)) * (1 + 1e-9)])


def _point(stats: optimize.ExitStats, thresholds: np.ndarray, head_pred: np.ndarray, reference: np.ndarray,
           labels) -> tuple[dict, np.ndarray]:
    """(numbers, exit per sample) of one threshold setting on the recorded predictions."""
    result = optimize.evaluate_cascade(stats, thresholds)
    taken = optimize.exit_assignment(stats, thresholds)
    n = len(reference)
    final = np.where(taken >= 0, head_pred[np.maximum(taken, 0), np.arange(n)], reference) if len(head_pred) \
        else reference
    return ({"flops_fraction": result.flops_fraction, "agreement": 1.0 - result.drop,
             "accuracy": float((final == labels).mean()) if labels is not None else None}, taken)


def tradeoff_curve(ee, data: dict, layers: list[str], points: int = CURVE_POINTS) -> dict:
    """Agreement and accuracy against mean FLOPs for the scaled family of the bundle's cascade, and the
    bundle's own operating point computed the same way (``"bundle"``: its thresholds, i.e. scale 1).

    Thresholds apply to the bundle's exit score (gate outputs for learned gates) and costs count the gates,
    so the operating point is what :func:`selfxit.evaluate.evaluation.evaluate` measures on the same samples.
    """
    names, stats, shape, family = _family(ee, data, layers)
    labels, reference = data["labels"], data["reference"]
    head_pred = data["head_pred"][[layers.index(n) for n in names]]
    curve = []
    scales = _curve_scales(stats.confidence, shape, points) if names else []
    for s in scales:
        numbers, taken = _point(stats, 1.0 - s * (1.0 - shape), head_pred, reference, labels)
        curve.append({"scale": float(s), **numbers, "early_rate": float((taken >= 0).mean())})
    own = np.array([ee.thresholds.get(n, optimize.OFF) for n in names], dtype=np.float64)
    numbers, taken = _point(stats, own, head_pred, reference, labels)
    rates = {n: float((taken == k).mean()) for k, n in enumerate(names) if n in ee.thresholds}
    bundle = {**numbers, "exit_rates": {**rates, "final": float((taken < 0).mean())}}
    return {"family": family, "exits": names, "points": curve, "bundle": bundle}


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
    """ECE (by :func:`selfxit.fit.calibrate.expected_calibration_error`) and the per-bin numbers of a
    reliability diagram, in the same equal-width bins.

    The report keeps only each head's confidence and whether it agrees, not its [N, classes] probabilities
    (too large for many classes); a two-column table whose first column is the confidence and whose
    "backbone answer" is column 0 where the head agrees gives ``expected_calibration_error`` exactly those
    confidences and agreements back through its max and argmax.
    """
    confidence = np.asarray(confidence, dtype=np.float32)
    correct = np.asarray(correct, dtype=bool)
    scores = torch.zeros(len(confidence), 2)
    scores[:, 0] = torch.from_numpy(confidence)
    ece = expected_calibration_error(scores, torch.from_numpy((~correct).astype(np.int64)), bins)
    edges = torch.linspace(0, 1, bins + 1).numpy()
    counts, mean_conf, mean_correct = [], [], []
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        counts.append(int(in_bin.sum()))
        mean_conf.append(_mean(confidence[in_bin].astype(np.float64)))
        mean_correct.append(_mean(correct[in_bin].astype(np.float64)))
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


def jsonable(value):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively (``report.json`` is strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
