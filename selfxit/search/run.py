"""NAS of exit heads with NNI 3.0: one experiment per candidate layer, resumable, with a trial history.

Each candidate layer gets its own NNI experiment over :class:`selfxit.search.space.HeadSpace`, run by
the in-process ``sequential`` engine unless the config passes an NNI ``training_service`` section.
A trial (:func:`evaluate_head`) trains the sampled head by KL to the backbone's softmax on a seeded
subsample of the medial dataset's *train* rows (``training.max_rows``, ``training.epochs``), measures
top-1 agreement with the backbone on the validation rows (``training.validation_split``, default the
*tune* split, so that *val* stays untouched for the certified threshold test of ``fit``) and the
head's FLOPs, and reports

    score = agreement - flops_weight * head_flops / remaining_flops(layer)

Why this exchange rate: an exit at layer l saves ``remaining_flops`` for every sample it answers and
costs ``head_flops`` for every sample that reaches it. If one point of agreement buys about one point
of exit rate at a fixed tolerance, a head is worth its extra FLOPs exactly when
``delta_agreement * remaining_flops > delta_head_flops``, i.e. ``flops_weight = 1``. A larger weight
prefers cheaper heads. Heads costing more than ``max_head_flops`` of the remaining FLOPs are never
trained: such a head can hardly pay for itself, and leaving them out bounds the trial time. With the
``random`` and ``evolution`` strategies the budget is an NNI constraint on the space
(:class:`selfxit.search.space.FlopsBudget`), so NNI only proposes heads within it; ``grid`` (it would
count every point of the space first) and ``tpe`` (NNI's tuner format has no constraints) propose any
head, and one over the budget is reported without training (status ``over_budget``, score -1).
A layer whose best agreement stays below the majority-class rate plus ``drop_margin`` (near chance)
is dropped, as in the SelfXit paper.

Output folder::

    search_config.json            the config and the medial dataset it ran on; a resumed search must match
    layers/<layer>/history.jsonl  one line per trial: choices, concrete spec, status, score, agreement,
                                  head FLOPs and parameters, seconds, error
    layers/<layer>/result.json    the layer's best trial and whether it is kept (once its budget is spent)
    best_heads.json               {"heads": {layer: concrete conv_linear spec}, "dropped", "layers", ...}
    nni/                          NNI's experiment folders (logs, checkpoints) and experiment manifest

Resuming: a layer with a ``result.json`` for at least the requested budget is skipped; otherwise its
experiment is replayed with the same seed, and trials whose architecture is already in the history are
answered from it without training (in-process engine), so an interrupted search continues where it
stopped. A trial that raises is logged (stderr and ``nni/<id>/log/experiment.log``), recorded as
``failed`` and the search goes on.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selfxit.core.flops import count_flops
from selfxit.core.heads import build_head
from selfxit.extras import require_extra
from selfxit.fit.distill import DistillConfig, distill_head, head_logits, seeded
from selfxit.fit.medial import MedialDataset
from selfxit.search.config import SearchConfig, SpaceConfig, load_config, searched_spec
from selfxit.search.experiment import _experiment_class, _experiment_config, _nni_contained
from selfxit.search.results import FORMAT_VERSION, LayerResult, SearchResult, apply_search, load_search  # noqa: F401

OBJECTIVE = "score = agreement - flops_weight * head_flops / remaining_flops"
OVER_BUDGET_SCORE = -1.0
CONSTRAINED = ("random", "evolution")  # strategies that take the FLOPs budget as an NNI constraint
_logger = logging.getLogger(__name__)

# In-process engine only: results already in a layer's history, by cache id then architecture (a trial
# asked for one of them answers from here), and error messages of failed trials, by cache id then sample.
_CACHE: dict[str, dict[str, dict]] = {}
_ERRORS: dict[str, dict[str, str]] = {}


# ---- the trial ---------------------------------------------------------------------------------------------

def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _rows(medial: MedialDataset, split: str, limit: int | None, seed: int) -> np.ndarray:
    rows = medial.indices(split)
    if limit is not None and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def evaluate_head(model, job: dict) -> dict:
    """NNI trial: train the frozen ``HeadSpace`` sample's head and report its score (see module docs).

    ``job`` is plain data (medial folder, layer, shape, classes, remaining FLOPs, training and objective
    settings, seed, cache id), so the trial also runs in a training-service process that opens the
    medial folder at the same path.
    """
    import nni
    spec_key = _key(model.spec)
    cached = _CACHE.get(job["cache"], {}).get(spec_key)
    if cached is not None:
        metric = {**cached, "cached": True}
        nni.report_final_result(metric)
        return metric
    try:
        metric = _train_and_measure(model, job)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        _ERRORS.setdefault(job["cache"], {})[spec_key] = message
        _logger.warning("search trial at %s failed (%s); the search goes on", job["layer"], message)
        raise
    nni.report_final_result(metric)
    return metric


def _train_and_measure(model, job: dict) -> dict:
    start = time.perf_counter()
    head, shape, training, objective = model.head, tuple(job["shape"]), job["training"], job["objective"]
    flops = count_flops(head, torch.zeros(1, *shape))
    params = sum(p.numel() for p in head.parameters())
    metric = {"spec": model.spec, "head_flops": flops, "head_params": params, "cached": False}
    cap = objective["max_head_flops"]
    if cap is not None and flops > cap * job["remaining_flops"]:
        return {**metric, "default": OVER_BUDGET_SCORE, "status": "over_budget", "agreement": None,
                "seconds": time.perf_counter() - start}
    medial = MedialDataset(job["medial"])
    train = _rows(medial, "train", training["max_rows"], job["seed"])
    valid = medial.indices(training["validation_split"])
    with seeded(job["seed"]):  # same initial weights for the same architecture, whatever NNI did before
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    config = DistillConfig(epochs=training["epochs"], batch_size=training["batch_size"], lr=training["lr"],
                           weight_decay=training["weight_decay"], seed=job["seed"])
    distill_head(head, medial, job["layer"], train, config, progress=False)
    predictions = head_logits(head, medial, job["layer"], valid).argmax(1)
    agreement = float((predictions == medial.teacher(valid).argmax(1)).float().mean())
    score = agreement - objective["flops_weight"] * flops / job["remaining_flops"]
    return {**metric, "default": score, "status": "trained", "agreement": agreement,
            "seconds": time.perf_counter() - start}


# ---- one experiment per layer ------------------------------------------------------------------------------

class _Recorder:
    """Listens to NNI's model events: appends history rows, tracks the best trial, moves the progress bar."""

    def __init__(self, path: Path, rows: list[dict], cache: str, bar, log_hint: str, space: SpaceConfig,
                 shape: tuple[int, ...]):
        self.path, self.rows, self.cache, self.bar, self.log_hint = path, rows, cache, bar, log_hint
        self.space, self.shape = space, shape
        self.seen = {_key(r["choices"]) for r in rows}
        self.metrics: dict[int, dict] = {}

    def on_metric(self, event) -> None:
        self.metrics[id(event.model)] = event.metric if isinstance(event.metric, dict) else {"default": event.metric}

    def on_end(self, event) -> None:
        from nni.nas.space import ModelStatus
        if event.status not in (ModelStatus.Trained, ModelStatus.Failed):
            return  # interrupted: not a result
        sample = {k: v for k, v in (event.model.sample or {}).items() if not k.startswith("__")}
        metric = self.metrics.pop(id(event.model), None)
        if event.status == ModelStatus.Trained and metric is not None:
            row = {"choices": sample, **{k: metric.get(k) for k in ("spec", "status", "agreement", "head_flops",
                                                                     "head_params", "seconds", "cached")},
                   "score": metric.get("default"), "error": None}
        else:
            try:
                spec = self.space.spec(sample, self.shape)
            except (KeyError, TypeError, ValueError):
                spec = None
            error = _ERRORS.get(self.cache, {}).pop(_key(spec), None) or f"trial failed; see {self.log_hint}"
            row = {"choices": sample, "spec": spec, "status": "failed", "agreement": None, "head_flops": None,
                   "head_params": None, "seconds": None, "cached": False, "score": None, "error": error}
        if _key(sample) not in self.seen or row["status"] == "failed":
            row = {"trial": len(self.rows), "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   **row}
            self.rows.append(row)
            self.seen.add(_key(sample))
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if row["status"] != "failed":
                _CACHE.setdefault(self.cache, {})[_key(row["spec"])] = _cache_entry(row)
        best = _best(self.rows)
        if best is not None:
            self.bar.set_postfix(best=f"{best['score']:.3f}", agree=f"{best['agreement']:.3f}",
                                 mflops=f"{best['head_flops'] / 1e6:.2f}")
        self.bar.update(1)


def _cache_entry(row: dict) -> dict:
    """The metric a trial reports, rebuilt from its history row (to answer a repeated architecture)."""
    return {"default": row["score"], **{k: row[k] for k in ("spec", "status", "agreement", "head_flops",
                                                             "head_params", "seconds")}}


def _best(rows: list[dict], min_agreement: float = -1.0) -> dict | None:
    """The best-score trained trial among those whose agreement clears ``min_agreement`` (the near-chance bar):
    a layer is kept for a head that clears the bar, so the head returned must be one that does."""
    trained = [r for r in rows if r["status"] == "trained" and r["agreement"] >= min_agreement]
    return max(trained, key=lambda r: (r["score"], -r["head_flops"])) if trained else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that trial runs again
                _logger.warning("%s line %d is incomplete; ignoring it", path, number)
    return rows


def _cheapest_flops(config: SearchConfig, candidate, num_classes: int) -> int:
    spec = config.space.spec(config.space.cheapest(tuple(candidate.shape)), tuple(candidate.shape))
    return count_flops(build_head(spec, tuple(candidate.shape), num_classes), torch.zeros(1, *candidate.shape))


def _space_inputs(space: SpaceConfig, shape: tuple[int, ...]) -> list[dict]:
    """A spec per (conv_layers, pool) choice of the space: between them, every input its heads read."""
    labels, base = space.labels(shape), space.cheapest(shape)
    return [space.spec({**base, "conv_layers": c, "pool": p}, shape) if "pool" in labels else space.spec(base, shape)
            for c in labels.get("conv_layers", [0]) for p in labels.get("pool", [None])]


def _search_layer(index: int, candidate, medial: MedialDataset, num_classes: int, config: SearchConfig,
                  out: Path, budget: int, majority: float, progress: bool) -> LayerResult:
    from nni.nas.evaluator import FunctionalEvaluator

    from selfxit.search.space import HeadSpace, build_strategy  # NNI: only when a search runs
    layer_dir = out / "layers" / _slug(candidate.name)
    result_file = layer_dir / "result.json"
    if result_file.exists():
        done = LayerResult(**json.loads(result_file.read_text()))
        if done.trials >= budget:
            return done
    layer_dir.mkdir(parents=True, exist_ok=True)
    rows = _read_history(layer_dir / "history.jsonl")
    cache = f"{out.resolve()}::{candidate.name}"
    _CACHE[cache] = {_key(r["spec"]): _cache_entry(r) for r in rows if r["status"] != "failed"}
    exp_id = f"selfxit-{index:02d}-{re.sub(r'[^A-Za-z0-9_-]', '_', candidate.name)}"[:32]
    job = {"medial": medial.location, "layer": candidate.name, "shape": list(candidate.shape),
           "num_classes": num_classes, "remaining_flops": int(candidate.remaining_flops),
           "training": asdict(config.training), "objective": asdict(config.objective), "seed": config.seed,
           "cache": cache}
    strategy = build_strategy(config, zlib.crc32(candidate.name.encode()) % 10**6)  # layers sample differently
    cap = config.objective.max_head_flops
    if cap is not None and _cheapest_flops(config, candidate, num_classes) > cap * candidate.remaining_flops:
        result = LayerResult(candidate.name, list(candidate.shape), int(candidate.remaining_flops), budget, False,
                             f"no head of the space fits max_head_flops {cap} of the remaining FLOPs", 0.0, None, 0.0)
        _write_json(result_file, asdict(result))
        return result
    max_flops = cap * candidate.remaining_flops if cap is not None and config.strategy in CONSTRAINED else None
    start = time.perf_counter()
    with tqdm(total=budget, desc=f"search {candidate.name}", disable=not progress) as bar:
        recorder = _Recorder(layer_dir / "history.jsonl", rows, cache, bar, str(out / "nni" / exp_id / "log"),
                             config.space, tuple(candidate.shape))
        experiment = _experiment_class()(
            HeadSpace(config.space.to_dict(), list(candidate.shape), num_classes, max_flops),
            FunctionalEvaluator(evaluate_head, job=job), strategy,
            _experiment_config(config, budget, out / "nni"), id=exp_id, recorder=recorder)
        with _nni_contained(out / "nni", spawns_processes=config.training_service is not None):
            try:
                finished = experiment.run()
            except BaseException:
                experiment.stop()
                raise
            finally:
                _CACHE.pop(cache, None), _ERRORS.pop(cache, None)
            if finished is None:  # NNI caught Ctrl-C and stopped the experiment
                raise KeyboardInterrupt(f"search interrupted at layer {candidate.name}; run it again to resume")
            experiment.stop()
    bar_needed = majority + config.objective.drop_margin
    best = _best(rows, bar_needed)
    best_agreement = max((r["agreement"] for r in rows if r["status"] == "trained"), default=None)
    if best_agreement is None:
        kept, reason, best = False, "no trial trained (all failed or over the FLOPs budget)", None
    elif best is None:
        kept, reason, best = False, (f"near chance: best agreement {best_agreement:.3f} < majority rate "
                                     f"{majority:.3f} + drop_margin {config.objective.drop_margin}"), _best(rows)
    else:
        kept, reason = True, f"best score {best['score']:.4f} (agreement {best['agreement']:.3f})"
    previous = json.loads(result_file.read_text())["seconds"] if result_file.exists() else 0.0
    result = LayerResult(candidate.name, list(candidate.shape), int(candidate.remaining_flops), budget, kept, reason,
                         majority, best, previous + time.perf_counter() - start)
    _write_json(result_file, asdict(result))
    return result


# ---- the whole search --------------------------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _medial_fingerprint(medial: MedialDataset) -> dict:
    """What identifies the traffic a search ran on; robust to last-bit float differences of a re-recording."""
    digest = hashlib.sha1(np.ascontiguousarray(medial.split).tobytes())
    digest.update(np.ascontiguousarray(medial.source).tobytes())
    digest.update(medial.top1(np.arange(min(2048, medial.meta.num_samples))).numpy().astype(np.int64).tobytes())
    return {"candidates": list(medial.candidates), "shapes": [list(s) for s in medial.meta.shapes],
            "num_samples": medial.meta.num_samples, "seed": medial.meta.seed, "traffic_sha1": digest.hexdigest()}


def _check_resumable(out: Path, stored: dict) -> None:
    """Write the config record, or check that the one already in ``out`` describes the same search."""
    path = out / "search_config.json"
    if not path.exists():
        _write_json(path, stored)
        return
    before = json.loads(path.read_text())
    differs = [f"{section}.{k}" for section in ("config", "medial")
               for k in sorted(set(before.get(section, {})) | set(stored[section]))
               if before.get(section, {}).get(k) != stored[section].get(k)]
    if differs:
        raise ValueError(f"{out} holds a search with a different {', '.join(differs)}; its trials cannot be reused. "
                         "Use another --out folder or delete this one")


def run_search(medial: MedialDataset, candidates: list, num_classes: int, config, out_dir: str | Path,
               trials: int | None = None, progress: bool = True) -> SearchResult:
    """Search a head per candidate layer on ``medial`` (see the module docs); resumes what ``out_dir`` holds.

    ``candidates``: :class:`selfxit.core.candidates.Candidate` s (name, shape, remaining FLOPs). ``config``: a
    path to a YAML/JSON config, a dict or a :class:`SearchConfig`. ``trials`` overrides
    ``trials_per_layer``.
    """
    require_extra("search", "selfxit search")
    config = load_config(config)
    budget = config.trials_per_layer if trials is None else trials
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"trials must be a positive integer; got {trials!r}")
    if not candidates:
        raise ValueError("no candidate layers to search")
    for cand in candidates:  # every shape check before any training
        if cand.name not in medial.candidates:
            raise ValueError(f"candidate {cand.name!r} is not in the medial dataset (it has {medial.candidates})")
        recorded = tuple(medial.meta.shapes[medial.candidates.index(cand.name)])
        if recorded != tuple(cand.shape):
            raise ValueError(f"candidate {cand.name!r} has shape {tuple(cand.shape)} but the medial dataset recorded "
                             f"{recorded}")
        config.space.check_fits(cand.name, tuple(cand.shape))
        for spec in _space_inputs(config.space, tuple(cand.shape)):  # the medial dataset stored what they read
            medial.check_heads({cand.name: spec})
    validation = medial.indices(config.training.validation_split)
    if len(validation) == 0 or len(medial.indices("train")) == 0:
        raise ValueError(f"the medial dataset has no train or {config.training.validation_split} rows; collect more "
                         "traffic")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reused = {k: v for k, v in config.to_dict().items() if k not in ("trials_per_layer", "training_service",
                                                                     "trial_concurrency")}
    _check_resumable(out, {"config": reused, "medial": _medial_fingerprint(medial)})
    top1 = medial.teacher(validation).argmax(1).numpy()
    majority = float(np.bincount(top1, minlength=num_classes).max() / len(top1))
    start = time.perf_counter()
    layers = [_search_layer(i, cand, medial, num_classes, config, out, budget, majority, progress)
              for i, cand in enumerate(candidates)]
    space = config.space
    result = SearchResult(out, layers, {r.layer: searched_spec(space, r.best["choices"], tuple(r.shape)) for r in layers if r.kept},
                          {r.layer: r.reason for r in layers if not r.kept}, time.perf_counter() - start)
    _write_json(out / "best_heads.json", {
        "format_version": FORMAT_VERSION, "objective": OBJECTIVE, "config": config.to_dict(),
        "candidates": [{"name": c.name, "shape": list(c.shape), "remaining_flops": int(c.remaining_flops)}
                       for c in candidates],
        "heads": result.heads, "dropped": result.dropped, "layers": [asdict(r) for r in layers]})
    return result


__all__ = ["LayerResult", "SearchResult", "SpaceConfig", "evaluate_head", "run_search", "load_search", "apply_search"]
