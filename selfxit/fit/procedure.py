"""The body of ``EarlyExitModel.fit``: heads by distillation, temperatures, gates, exits and thresholds.

Splits of the medial dataset and what each is for (nothing here reads a label):

- *train*: heads are distilled to the backbone's softmax;
- *tune*: temperatures, near-chance pruning, the cascade's shape (and learned gates), and the conformal
  calibration of prediction sets;
- *val*: untouched until the certified scale is chosen on it (Learn-then-Test), so the promise holds;
- *test*: held back for the report.

The conformal sets are calibrated on *tune*, not on the *val* samples whose agreement picked the
certified scale: calibration and selection use disjoint samples.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from selfxit.core.candidates import Candidate
from selfxit.core.cascade import independent_of
from selfxit.core.exits import CertifiedFamily, ExitRecord
from selfxit.core.flops import count_flops
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.fit import cascade as chaining
from selfxit.fit import conformal, select
from selfxit.fit import gates as gating
from selfxit.fit.calibrate import CalibrationBins, fit_temperature
from selfxit.fit.config import FitConfig
from selfxit.fit.distill import distill_head, head_logit_chunks, head_logits, seeded
from selfxit.fit.medial import SPLITS, MedialDataset
from selfxit.fit.results import FitReport, HeadReport, summary

SCORED = ("tune", "val", "test")


class FitOutcome:
    """What :func:`fit_exits` produced: the exit records, the gate mode, the calibration, the report and
    (method 'certified') the certified family of thresholds."""

    def __init__(self, records: dict[str, ExitRecord], gate: str, calibration, report: FitReport,
                 family: CertifiedFamily | None = None):
        self.records, self.gate, self.calibration, self.report = records, gate, calibration, report
        self.family = family


def head_specs(candidates: list[Candidate], heads: dict | None, previous: dict[str, ExitRecord]) -> dict[str, dict]:
    """Spec per candidate: one spec for all (``{"kind": ...}``), a per-layer dict, or what is already trained."""
    names = [c.name for c in candidates]
    if heads is None:
        return {n: previous[n].spec if n in previous else DEFAULT_HEAD for n in names}
    if "kind" in heads:
        return {n: heads for n in names}
    unknown = set(heads) - set(names)
    if unknown:
        raise ValueError(f"head specs for unknown layers {sorted(unknown)}; candidates are {names}")
    return {n: heads.get(n, DEFAULT_HEAD) for n in names}


def _release_freed_memory() -> None:
    """Hand memory that Python and torch already freed back to the OS (glibc's ``malloc_trim``; elsewhere
    nothing). Between heads this keeps a fit's peak RSS from stacking up the freed temporaries of every
    earlier head: glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so without
    it the peak grew with the rows scored although the live memory did not."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if callable(_TRIM):
        _TRIM(0)


_TRIM: Callable[[int], int] | bool | None = None  # libc's malloc_trim, False where there is none


def _warm(head: nn.Module, warm: nn.Module | None) -> None:
    """Copy ``warm``'s weights into the fresh ``head`` when the architectures match (else keep the fresh init)."""
    if warm is None:
        return
    try:
        head.load_state_dict(warm.state_dict())
    except RuntimeError:
        pass  # the spec changed since the warm head was trained: start fresh


def train_heads(candidates, medial, rows, specs, previous, config: FitConfig, num_classes, warm_start, progress):
    """A trained head record per candidate (reusing ``previous`` ones with the same spec unless retrain): the
    one head-training step of a fit, also run per layer as a Ray task by :mod:`selfxit.ops.ray_jobs`."""
    records: dict[str, ExitRecord] = {}
    for cand in tqdm(candidates, desc="heads", disable=not progress):
        old = previous.get(cand.name)
        reused = None if config.retrain or old is None or old.spec != specs[cand.name] else independent_of(old.head)
        head: nn.Module
        if reused is None:  # (a chained head is never reused as an independent one)
            with seeded(config.distill.seed):  # the caller's global RNG is left as it was
                head = build_head(specs[cand.name], cand.shape, num_classes)
            _warm(head, (warm_start or {}).get(cand.name))
            distill_head(head, medial, cand.name, rows["train"], config.distill, progress)
            _release_freed_memory()
        else:
            head = reused
        records[cand.name] = ExitRecord(cand.name, head, spec=specs[cand.name], shape=tuple(cand.shape),
                                        head_flops=count_flops(head, torch.zeros(1, *cand.shape)))
    return records


def fit_exits(candidates: list[Candidate], medial: MedialDataset, num_classes: int, backbone_flops: int,
              config: FitConfig, previous: dict[str, ExitRecord] | None = None,
              warm_start: dict[str, nn.Module] | None = None, progress: bool = True) -> FitOutcome:
    """Train, calibrate and prune a head per candidate, then choose the cascade by ``config.method``."""
    previous = previous or {}
    rows = {name: medial.indices(name) for name in SPLITS}
    top1 = {name: medial.top1(r) for name, r in rows.items()}
    majority = float(np.bincount(top1["tune"], minlength=num_classes).max()) / max(len(rows["tune"]), 1)
    specs = head_specs(candidates, config.heads, previous)
    medial.check_heads(specs)  # every head's input was stored, before any training
    trained = train_heads(candidates, medial, rows, specs, previous, config, num_classes, warm_start, progress)

    reports, kept = [], []
    # Scoring streams: per kept head and split only the calibrated max-softmax and top-1 [N] are kept, and
    # the val ECE is summed chunk by chunk, so a fit's memory does not grow by heads x rows x classes floats.
    # Only learned gates read every head's full calibrated log-softmax on every split (held in memory then:
    # an opt-in); the conformal sets re-score each sample's own exit from the store, chunk by chunk.
    keep_log_probs = config.gate == "learned"
    log_probs: dict[str, list] = {s: [] for s in SCORED}
    scores: dict[str, list] = {s: [] for s in SCORED}  # (confidence, top-1) of each kept head
    for cand in candidates:
        record = trained[cand.name]
        tune_logits = head_logits(record.head, medial, cand.name, rows["tune"])  # the temperature's LBFGS reads all
        record.temperature = fit_temperature(tune_logits, top1["tune"])
        keep = float((tune_logits.argmax(1) == top1["tune"]).float().mean()) >= majority + config.near_chance_margin
        scored = {s: _score(record, medial, cand.name, rows[s], top1[s], keep_log_probs and keep,
                            tune_logits if s == "tune" else None) for s in SCORED}
        del tune_logits
        _release_freed_memory()
        reports.append(HeadReport(cand.name, record.head_flops, cand.remaining_flops, scored["val"].agreement,
                                  record.temperature, scored["val"].ece_raw, scored["val"].ece, keep,
                                  getattr(medial, "stored_bytes", {}).get(cand.name)))
        if keep:
            kept.append(cand)
            for s in SCORED:
                scores[s].append((scored[s].confidence, scored[s].top1))
                if keep_log_probs:
                    log_probs[s].append(scored[s].log_probs)
    records = {c.name: trained[c.name] for c in kept}  # near-chance heads are discarded, in every record
    layers = [c.name for c in kept]
    held = {s: torch.stack(v) if v else torch.zeros(0, len(rows[s]), num_classes) for s, v in log_probs.items()}
    sources: dict[str, conformal.LogProbs] = (
        dict(held) if keep_log_probs else {s: _StoredLogProbs(records, layers, medial, rows[s]) for s in SCORED})
    stats = {s: _stats(scores[s], len(rows[s]), top1[s], [records[n].head_flops for n in layers],
                       [c.remaining_flops for c in kept], backbone_flops) for s in SCORED}
    confidence_stats, confidence_layers = stats, layers

    if config.gate == "learned":
        heads = {n: r.head for n, r in records.items()}
        temperatures = {n: r.temperature for n, r in records.items()}
        fitted = gating.fit_with_heads(held, top1, layers, heads, temperatures, medial, rows,
                                       stats["tune"].head_flops, stats["tune"].remaining_flops, backbone_flops,
                                       config.tolerance, config.max_exits, config.gate_config, progress,
                                       design_factor=config.design_factor)
        for name in layers:  # head rounds may have specialised heads and refitted temperatures
            records[name].head, records[name].temperature = heads[name], temperatures[name]
        stats = {s: fitted.stats(held[s], top1[s], stats[s].head_flops, stats[s].remaining_flops, backbone_flops)
                 for s in stats}
        sources = {s: lp[fitted.chain] for s, lp in held.items()}
        layers = [layers[k] for k in fitted.chain]
        for name, gate in zip(layers, fitted.gates):
            records[name].gate = gate

    results, cert = choose_thresholds(stats, config)
    if config.gate == "learned":  # the paper's rule and 'joint' could drop exits whose output a later gate reads
        results = {"certified": results["certified"]}
    thresholds, level = results[config.method]
    if config.cascade:  # chain the designed exits (cascade connections, ensembles, survivor rounds) and redo
        members = chaining.chain_members(layers, thresholds, cert.shape if cert is not None else None)
        if members:
            chain = chaining.fit_chain(records, members, {c.name: c.remaining_flops for c in kept}, medial, rows,
                                       top1, config, num_classes, backbone_flops, progress, config.ensemble_split)
            records.update({r.layer: r for r in chain.records})
            layers, sources, stats = members, dict(chain.log_probs), chain.stats
            results, cert = choose_thresholds(stats, config)
            thresholds, level = results[config.method]
            thresholds = chaining.with_pass_through(thresholds)
            if cert is not None and cert.shape is not None:
                cert.shape = chaining.with_pass_through(cert.shape)
    for k, name in enumerate(layers):
        records[name].threshold = float(thresholds[k]) if np.isfinite(thresholds[k]) else None
    baselines = {m: {s: summary(stats[s], th, layers) for s in ("val", "test") if len(rows[s])}
                 for m, (th, _) in results.items()}
    if config.gate == "learned":
        th = choose_thresholds(confidence_stats, config)[0]["certified"][0]
        baselines["confidence"] = {s: summary(confidence_stats[s], th, confidence_layers)
                                   for s in ("val", "test") if len(rows[s])}
    active = [int(k) for k in np.flatnonzero(np.isfinite(thresholds))]
    taken = {s: select.exit_assignment(stats[s], thresholds) for s in ("tune", "test")}
    calibration = conformal.calibrate_cascade(layers, active, sources["tune"], taken["tune"], top1["tune"])
    set_quality = conformal.cascade_set_quality(calibration, layers, active, sources["test"], taken["test"],
                                                top1["test"]) if len(rows["test"]) else {}
    report = FitReport(config.tolerance, config.method, level, reports, baselines[config.method]["val"],
                       baselines[config.method].get("test"), baselines, config.gate,
                       gating.config_dict(config.gate_config) if config.gate == "learned" else None, set_quality)
    family = None
    if config.method == "certified" and cert is not None and cert.shape is not None:
        family = CertifiedFamily({layers[k]: float(cert.shape[k]) for k in np.flatnonzero(np.isfinite(cert.shape))},
                                 cert.scale, cert.scales, config.tolerance, config.delta)
    return FitOutcome(records, config.gate, calibration, report, family)


def _stats(scores: list[tuple[torch.Tensor, torch.Tensor]], n: int, top1: torch.Tensor, head_flops, remaining,
           backbone_flops) -> select.ExitStats:
    """ExitStats of max-softmax exits from each exit's (calibrated max probability [N], top-1 [N])."""
    if not scores:
        return select.ExitStats(np.zeros((0, n)), np.zeros((0, n), bool), head_flops, remaining, backbone_flops)
    return select.ExitStats(np.stack([c.numpy() for c, _ in scores]),
                            np.stack([(top == top1).numpy() for _, top in scores]), head_flops, remaining,
                            backbone_flops)


class _Scored:
    """One head on one split: calibrated max-softmax and top-1 [N], agreement with the backbone, ECE before
    and after the temperature, and (only when asked) the calibrated log-softmax [N, C]."""

    def __init__(self, confidence, top1, agreement, ece_raw, ece, log_probs):
        self.confidence, self.top1, self.agreement = confidence, top1, agreement
        self.ece_raw, self.ece, self.log_probs = ece_raw, ece, log_probs


def _score(record: ExitRecord, medial: MedialDataset, layer: str, rows: np.ndarray, top1: torch.Tensor,
           keep_log_probs: bool, logits: torch.Tensor | None = None) -> _Scored:
    """Score a head on stored rows chunk by chunk (``logits``: the split's logits when already computed)."""
    chunks = [logits] if logits is not None else head_logit_chunks(record.head, medial, layer, rows)
    raw, calibrated = CalibrationBins(), CalibrationBins()
    confidence, top, kept, start = [], [], [], 0
    for z in chunks:
        target = top1[start:start + len(z)]
        start += len(z)
        raw.add(z.softmax(1), target)
        p = (z / record.temperature).softmax(1)
        calibrated.add(p, target)
        c, t = p.max(1)
        confidence.append(c)
        top.append(t)
        if keep_log_probs:
            kept.append((z / record.temperature).log_softmax(1))
    confidence_all = torch.cat(confidence) if confidence else torch.zeros(0)
    top_all = torch.cat(top) if top else torch.zeros(0, dtype=torch.long)
    agreement = float((top_all == top1).float().mean()) if len(top_all) else float("nan")
    return _Scored(confidence_all, top_all, agreement, raw.error(), calibrated.error(),
                   torch.cat(kept) if kept else None)


class _StoredLogProbs:
    """:data:`selfxit.fit.conformal.LogProbs` of independent heads, computed from the medial store on demand
    (exit ``k``, positions within the split ``rows``), so the conformal step holds one chunk at a time."""

    def __init__(self, records: dict[str, ExitRecord], layers: list[str], medial: MedialDataset, rows: np.ndarray):
        self.records, self.layers, self.medial, self.rows = records, layers, medial, np.asarray(rows)

    def __call__(self, k: int, positions: np.ndarray) -> torch.Tensor:
        record = self.records[self.layers[k]]
        logits = head_logits(record.head, self.medial, self.layers[k], self.rows[np.asarray(positions, dtype=np.int64)])
        return (logits / record.temperature).log_softmax(1)


def choose_thresholds(stats: dict[str, select.ExitStats], config: FitConfig):
    """Thresholds per method: the paper's rule and the joint optimizer on val, and the certified cascade
    (designed on 'tune', its scaled family tested on the untouched 'val' samples); with the certification
    (None when there is no exit to certify)."""
    val, tune = stats["val"], stats["tune"]
    if val.num_exits == 0:
        off = np.full(0, select.OFF)
        return {m: (off, 1.0 - config.delta if m == "certified" else 0.0)
                for m in ("paper", "joint", "certified")}, None
    paper = select.best_subset(val, config.tolerance, config.max_exits)
    off = np.full(val.num_exits, select.OFF)
    joint = select.best_within(select.joint_path(val, [paper, off], max_exits=config.max_exits), config.tolerance)
    cert = select.certified_cascade(tune, val, config.tolerance, config.delta, config.max_exits, config.design_factor)
    return {"paper": (paper, 0.0), "joint": (joint.thresholds, 0.0),
            "certified": (cert.chosen.thresholds, cert.confidence_level)}, cert
