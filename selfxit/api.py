"""The one-call entry points: ``wrap`` a frozen model, ``collect`` traffic, ``fit`` exits, run, save, ``load``."""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from selfxit.fit import conformal
from selfxit.fit import gates as gating
from selfxit.fit import select as optimize
from selfxit.core.bundle import BundleError, backbone_fingerprint, load_bundle, save_bundle
from selfxit.fit.calibrate import expected_calibration_error, fit_temperature
from selfxit.core.candidates import Candidate, find_candidates
from selfxit.core.provenance import Provenance
from selfxit.fit.distill import DistillConfig, distill_head, head_logits
from selfxit.core.flops import count_flops
from selfxit.fit.gates import GATES, GateConfig, build_gate
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.fit.medial import SPLITS, MedialDataset
from selfxit.fit.record import record
from selfxit.core.runtime import EarlyExitOutput, EarlyExitRunner, Exit

METHODS = ("certified", "joint", "paper")


@dataclass
class HeadReport:
    """How one candidate's head turned out (agreement and ECE on the val split)."""

    layer: str
    head_flops: int
    remaining_flops: int
    agreement: float
    temperature: float
    ece_before: float
    ece_after: float
    kept: bool


@dataclass
class CascadeSummary:
    """A cascade's numbers on one split, computed from recorded predictions."""

    exits: list[str]
    thresholds: list[float]
    flops_fraction: float
    agreement: float
    exit_rates: list[float]


@dataclass
class FitReport:
    """What ``fit`` did: per-head quality, the chosen cascade, and how other methods compare."""

    tolerance: float
    method: str
    confidence_level: float
    heads: list[HeadReport]
    chosen_val: CascadeSummary
    chosen_test: CascadeSummary | None
    baselines: dict[str, dict[str, CascadeSummary]] = field(default_factory=dict)  # method -> split -> summary
    gate: str = "confidence"  # what the thresholds apply to: max-softmax or learned gate outputs
    gate_config: dict | None = None
    prediction_sets: dict[str, conformal.SetQuality] = field(default_factory=dict)  # str(alpha) -> test split


def _summary(stats: optimize.ExitStats, thresholds: np.ndarray, layers: list[str]) -> CascadeSummary:
    r = optimize.evaluate_cascade(stats, thresholds)
    active = r.active
    return CascadeSummary([layers[k] for k in active], [float(thresholds[k]) for k in active], r.flops_fraction,
                          1.0 - r.drop, [float(r.exit_rates[k]) for k in active])


class EarlyExitModel:
    """A frozen backbone with candidate exit layers, trained heads and the chosen cascade."""

    def __init__(self, backbone: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                 candidates: list[Candidate], backbone_flops: int):
        self.backbone = backbone
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.candidates = list(candidates)
        self.backbone_flops = int(backbone_flops)
        self.medial: MedialDataset | None = None
        self.head_specs: dict[str, dict] = {}
        self.heads: dict[str, nn.Module] = {}
        self.head_flops: dict[str, int] = {}
        self.temperatures: dict[str, float] = {}
        self._thresholds: dict[str, float] = {}
        self.gate = "confidence"
        self.gates: dict[str, nn.Module] = {}  # layer -> learned gate (gate == 'learned')
        self.conformal: conformal.ConformalCalibration | None = None
        self.tolerance: float | None = None
        self.report: FitReport | None = None
        self.provenance = Provenance()  # how the bundle was built (model name, data split...), saved with it
        self._runner: EarlyExitRunner | None = None

    # ---- recording -----------------------------------------------------------------------------
    def collect(self, data, out_dir: str | Path | None = None, seed: int = 0, augment_copies: int = 2,
                batch_size: int = 128, num_workers: int = 0, progress: bool = True) -> MedialDataset:
        """Record the medial dataset from unlabeled traffic.

        ``data`` is a tensor of inputs, a sized Dataset, or a DataLoader over one (batches may be
        ``inputs`` or ``(inputs, labels, ...)``; labels are kept for reporting only).
        """
        loader, num_samples = _as_loader(data, batch_size, num_workers)
        if num_samples < 10:
            raise ValueError(f"need at least 10 traffic samples to split train/val/test; got {num_samples}")
        out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
        self.backbone.eval()
        self.heads.clear()  # heads belong to the medial dataset they were trained on
        self.medial = record(self.backbone, [c.name for c in self.candidates], [c.shape for c in self.candidates],
                             self.num_classes, loader, num_samples, out_dir, seed, augment_copies, progress)
        return self.medial

    # ---- training and optimization ---------------------------------------------------------------
    def fit(self, tolerance: float = 0.01, heads: dict | None = None, distill: DistillConfig | None = None,
            method: str = "certified", delta: float = 0.1, max_exits: int | None = 3,
            retrain: bool = False, progress: bool = True,
            warm_start: dict[str, nn.Module] | None = None, gate: str = "confidence",
            gate_config: GateConfig | None = None) -> FitReport:
        """Train a head per candidate (KL to the backbone), calibrate, and choose exits and thresholds.

        ``heads`` maps layer names to head specs (see :mod:`selfxit.core.heads`), or is one spec for all.
        ``method``: 'certified' (default) keeps the promise on unseen traffic with probability >= 1 - delta;
        'joint' and 'paper' only hold on the validation split. Heads already trained on this medial
        dataset with the same spec are reused unless ``retrain``. ``warm_start`` maps layer names to
        trained heads (e.g. the serving bundle's) that training starts from instead of a fresh init,
        where the spec matches. ``gate``: thresholds apply to the calibrated max-softmax ('confidence') or
        to learned gates ('learned', see :mod:`selfxit.fit.gates`; trained and designed on 'tune', certified on
        'val', so it needs ``method='certified'``). Conformal prediction sets are calibrated on 'val'.
        """
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), e.g. 0.01 for a 1% agreement drop; got {tolerance}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}; got {gate!r}")
        if gate == "learned" and method != "certified":
            raise ValueError(f"gate='learned' needs method='certified' (gates and the cascade are designed on 'tune' "
                             f"and certified on 'val'); got method={method!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {delta}")
        if self.medial is None:
            raise RuntimeError("no medial dataset: call collect(...) first")
        specs = self._head_specs(heads)
        medial = self.medial
        rows = {name: medial.indices(name) for name in SPLITS}
        teacher_top1 = {name: medial.teacher(r).argmax(1) for name, r in rows.items()}
        majority = float(np.bincount(teacher_top1["tune"], minlength=self.num_classes).max()) / max(len(rows["tune"]), 1)
        reports, kept, confidence, agree = [], [], {s: [] for s in ("tune", "val", "test")}, {s: [] for s in ("tune", "val", "test")}
        log_probs = {s: [] for s in confidence}  # calibrated log-softmax of each kept head
        for cand in tqdm(self.candidates, desc="heads", disable=not progress):
            head = self.heads.get(cand.name)
            if retrain or head is None or self.head_specs.get(cand.name) != specs[cand.name]:
                torch.manual_seed(distill.seed if distill else 0)
                head = build_head(specs[cand.name], cand.shape, self.num_classes)
                _load_warm_start(head, (warm_start or {}).get(cand.name))
                distill_head(head, medial, cand.name, rows["train"], distill, progress)
            flops = count_flops(head, torch.zeros(1, *cand.shape))
            logits = {s: head_logits(head, medial, cand.name, rows[s]) for s in ("tune", "val", "test")}
            temperature = fit_temperature(logits["tune"], teacher_top1["tune"])
            agreement = float((logits["val"].argmax(1) == teacher_top1["val"]).float().mean())
            keep = float((logits["tune"].argmax(1) == teacher_top1["tune"]).float().mean()) >= majority + 0.05
            reports.append(HeadReport(cand.name, flops, cand.remaining_flops, agreement, temperature,
                                      expected_calibration_error(logits["val"].softmax(1), teacher_top1["val"]),
                                      expected_calibration_error((logits["val"] / temperature).softmax(1),
                                                                 teacher_top1["val"]), keep))
            self.head_specs[cand.name], self.heads[cand.name] = specs[cand.name], head
            self.head_flops[cand.name], self.temperatures[cand.name] = flops, temperature
            if keep:
                kept.append(cand)
                for s in confidence:
                    probs = (logits[s] / temperature).softmax(1)
                    confidence[s].append(probs.max(1).values.numpy())
                    agree[s].append((probs.argmax(1) == teacher_top1[s]).numpy())
                    log_probs[s].append((logits[s] / temperature).log_softmax(1))
        layers = [c.name for c in kept]
        self.heads = {name: self.heads[name] for name in layers}  # near-chance heads are discarded
        stats = {s: optimize.ExitStats(np.stack(confidence[s]) if kept else np.zeros((0, len(rows[s]))),
                                       np.stack(agree[s]) if kept else np.zeros((0, len(rows[s])), bool),
                                       [self.head_flops[c.name] for c in kept], [c.remaining_flops for c in kept],
                                       self.backbone_flops) for s in confidence}
        log_probs = {s: torch.stack(v) if v else torch.zeros(0, len(rows[s]), self.num_classes)
                     for s, v in log_probs.items()}
        confidence_stats, confidence_layers = stats, layers
        self.gate, self.gates, config = gate, {}, gate_config or GateConfig()
        if gate == "learned":
            fitted = gating.fit_with_heads(log_probs, teacher_top1, layers, self.heads, self.temperatures, medial, rows,
                                           stats["tune"].head_flops, stats["tune"].remaining_flops,
                                           self.backbone_flops, tolerance, max_exits, config, progress)
            stats = {s: fitted.stats(log_probs[s], teacher_top1[s], stats[s].head_flops, stats[s].remaining_flops,
                                     self.backbone_flops) for s in stats}
            log_probs = {s: lp[fitted.chain] for s, lp in log_probs.items()}
            layers = [layers[k] for k in fitted.chain]
            self.gates = dict(zip(layers, fitted.gates))
        results = self._optimize(stats, tolerance, delta, max_exits)
        if gate == "learned":  # the paper's rule and 'joint' could drop exits whose output a later gate reads
            results = {"certified": results["certified"]}
        thresholds, level = results[method]
        self.thresholds = {layers[k]: float(thresholds[k]) for k in np.flatnonzero(np.isfinite(thresholds))}
        self.tolerance = tolerance
        baselines = {m: {s: _summary(stats[s], th, layers) for s in ("val", "test") if len(rows[s])}
                     for m, (th, _) in results.items()}
        if gate == "learned":
            th = self._optimize(confidence_stats, tolerance, delta, max_exits)["certified"][0]
            baselines["confidence"] = {s: _summary(confidence_stats[s], th, confidence_layers)
                                       for s in ("val", "test") if len(rows[s])}
        active = [int(k) for k in np.flatnonzero(np.isfinite(thresholds))]
        taken = {s: optimize.exit_assignment(stats[s], thresholds) for s in ("val", "test")}
        self.conformal = conformal.calibrate_cascade(layers, active, log_probs["val"], taken["val"], teacher_top1["val"])
        set_quality = conformal.cascade_set_quality(self.conformal, layers, active, log_probs["test"], taken["test"],
                                                    teacher_top1["test"]) if len(rows["test"]) else {}
        self.report = FitReport(tolerance, method, level, reports, baselines[method]["val"],
                                baselines[method].get("test"), baselines, gate,
                                gating.config_dict(config) if gate == "learned" else None, set_quality)
        return self.report

    def _head_specs(self, heads) -> dict[str, dict]:
        names = [c.name for c in self.candidates]
        if heads is None:
            return {n: self.head_specs.get(n, DEFAULT_HEAD) for n in names}
        if "kind" in heads:
            return {n: heads for n in names}
        unknown = set(heads) - set(names)
        if unknown:
            raise ValueError(f"head specs for unknown layers {sorted(unknown)}; candidates are {names}")
        return {n: heads.get(n, DEFAULT_HEAD) for n in names}

    @staticmethod
    def _optimize(stats, tolerance, delta, max_exits) -> dict[str, tuple[np.ndarray, float]]:
        """Thresholds per method: the paper's rule and the joint optimizer on val, and the certified cascade."""
        val, tune = stats["val"], stats["tune"]
        if val.num_exits == 0:
            off = np.full(0, optimize.OFF)
            return {m: (off, 1.0 - delta if m == "certified" else 0.0) for m in METHODS}
        paper = optimize.best_subset(val, tolerance, max_exits)
        off = np.full(val.num_exits, optimize.OFF)
        joint = optimize.best_within(optimize.joint_path(val, [paper, off], max_exits=max_exits), tolerance)
        # Certified: design the cascade on 'tune', test its scaled family on the untouched 'val' samples.
        cert = optimize.certified_cascade(tune, val, tolerance, delta, max_exits)
        return {"paper": (paper, 0.0), "joint": (joint.thresholds, 0.0),
                "certified": (cert.chosen.thresholds, cert.confidence_level)}

    def search(self, config, out_dir: str | Path, trials: int | None = None, progress: bool = True):
        """NAS of a head per candidate layer with NNI on the medial dataset (see :mod:`selfxit.search.run`).

        ``config``: a YAML/JSON path (e.g. ``search_spaces/conv_linear.yaml``), a dict or a SearchConfig;
        ``trials`` overrides its per-layer budget. Resumes what ``out_dir`` holds. Returns a SearchResult;
        use its heads with ``fit(heads=selfxit.search.apply_search(self, out_dir))``.
        """
        if self.medial is None:
            raise RuntimeError("no medial dataset: call collect(...) first")
        from selfxit.search.run import run_search
        return run_search(self.medial, self.candidates, self.num_classes, config, out_dir, trials, progress)

    # ---- inference ---------------------------------------------------------------------------------
    @property
    def thresholds(self) -> dict[str, float]:
        """Active exits and their confidence thresholds, in forward order."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: dict[str, float]) -> None:
        self._thresholds = dict(value)
        self._runner = None  # the runner is built from the active exits

    @property
    def exits(self) -> list[Exit]:
        """The active exits, in forward order."""
        return [Exit(name, self.heads[name], self.temperatures[name], th, self._gate(name))
                for name, th in self.thresholds.items()]

    def _gate(self, layer: str) -> nn.Module | None:
        if self.gate != "learned":
            return None
        if layer not in self.gates:
            raise ValueError(f"exit {layer!r} has no learned gate; gates were fitted for {list(self.gates)}")
        return self.gates[layer]

    def __call__(self, x: torch.Tensor, callback=None, shrink: bool = True,
                 prediction_sets: float | None = None) -> EarlyExitOutput:
        """Early-exit inference on a batch ``x`` of shape [B, *input_shape]; see :class:`EarlyExitRunner`.

        ``prediction_sets=alpha`` also returns, per sample, a conformal set of classes that contains the
        backbone's answer with probability >= 1 - alpha (alpha as calibrated by ``fit``: 0.01, 0.05, 0.1).
        """
        self.check_input(x)
        quantiles = None if prediction_sets is None else self.set_quantiles(prediction_sets)
        if self._runner is None:
            self._runner = EarlyExitRunner(self.backbone, self.exits, self.num_classes)
        out = self._runner(x, callback=callback, shrink=shrink)
        if quantiles is not None:
            out.prediction_sets = conformal.prediction_sets(out.probabilities, out.exit, out.predictions, quantiles)
        return out

    def set_quantiles(self, alpha: float) -> torch.Tensor:
        """[active exits] conformal quantiles at ``alpha``; ValueError when there is no calibration for it."""
        if self.conformal is None:
            raise ValueError("no conformal calibration in this model, so no prediction sets: fit(...) it (or load "
                             "a bundle that has one)")
        return self.conformal.quantile_vector(alpha, list(self.thresholds))

    def check_input(self, x) -> None:
        """Raise a clear error for inputs the backbone cannot take."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor of shape [batch, {', '.join(map(str, self.input_shape))}]; "
                            f"got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input dtype must be floating point (normalised images); got {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape or x.ndim != len(self.input_shape) + 1:
            raise ValueError(f"input shape must be [batch, {', '.join(map(str, self.input_shape))}]; got {list(x.shape)}")
        if len(x) == 0:
            raise ValueError("input batch is empty")

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bundle (heads as safetensors + manifest) atomically."""
        if not self.heads:
            raise RuntimeError("nothing to save: call fit(...) first")
        kept = [c for c in self.candidates if c.name in self.heads]
        manifest = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "backbone_fingerprint": backbone_fingerprint(self.backbone),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "backbone_flops": self.backbone_flops,
            "flops_counter": "deepspeed.profiling.flops_profiler (residual python adds not counted)",
            "candidates": [c.to_dict() for c in self.candidates],
            "heads": {c.name: {"spec": self.head_specs[c.name], "temperature": self.temperatures[c.name],
                               "head_flops": self.head_flops[c.name], "shape": list(c.shape)} for c in kept},
            "exits": [{"layer": n, "threshold": th} for n, th in self.thresholds.items()],
            "gate": self.gate,
            "gates": {name: g.spec() for name, g in self.gates.items()},
            "conformal": self.conformal.to_dict() if self.conformal else None,
            "tolerance": self.tolerance,
            "report": asdict(self.report) if self.report else None,
            "provenance": self.provenance.to_dict(),
        }
        weights = {name: head.state_dict() for name, head in self.heads.items()}
        weights.update({f"gate:{name}": g.state_dict() for name, g in self.gates.items()})
        return save_bundle(path, manifest, weights)


def _load_warm_start(head: nn.Module, warm: nn.Module | None) -> None:
    """Copy ``warm``'s weights into the fresh ``head`` when the architectures match (else keep the fresh init)."""
    if warm is None:
        return
    try:
        head.load_state_dict(warm.state_dict())
    except RuntimeError:
        pass  # the spec changed since the warm head was trained: start fresh


def _as_loader(data, batch_size: int, num_workers: int):
    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data)
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            return data, len(data.dataset)
        except TypeError as exc:
            raise TypeError("collect needs a DataLoader over a sized dataset (len(dataset) must work)") from exc
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("the traffic dataset is empty")
        return torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers), len(data)
    raise TypeError(f"collect takes a tensor, a sized Dataset or a DataLoader; got {type(data).__name__}")


def _example_output(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(example_input[:1])
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(f"the model must return [batch, classes] logits; got "
                         f"{type(out).__name__}{list(out.shape) if isinstance(out, torch.Tensor) else ''}")
    return out


def wrap(model: nn.Module, example_input: torch.Tensor, candidate_layers: list[str] | None = None,
         max_candidates: int = 10) -> EarlyExitModel:
    """Wrap a frozen classifier: find its candidate exit layers (or use ``candidate_layers``) and measure FLOPs.

    The model is put in eval mode with gradients off and is never modified otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 2 or not example_input.is_floating_point():
        raise ValueError("example_input must be a float tensor with a batch dimension, e.g. torch.zeros(1, 3, 32, 32)")
    model.eval().requires_grad_(False)
    out = _example_output(model, example_input)
    candidates = find_candidates(model, example_input[:1], max_candidates=max_candidates, names=candidate_layers)
    if not candidates:
        raise ValueError("no candidate exit layers found; pass candidate_layers=[module names]")
    total = count_flops(model, example_input[:1])
    return EarlyExitModel(model, tuple(example_input.shape[1:]), int(out.shape[1]), candidates, total)


def load(path: str | Path, model: nn.Module) -> EarlyExitModel:
    """Load a bundle for ``model``; refuses a bundle that was built for a different backbone."""
    manifest, states = load_bundle(path)
    fingerprint = backbone_fingerprint(model)
    if manifest.get("backbone_fingerprint") != fingerprint:
        raise BundleError(f"bundle {path} was built for backbone {manifest.get('backbone_fingerprint', '?')[:12]}, "
                          f"but this model is {fingerprint[:12]}: use the same weights, or rebuild the bundle")
    model.eval().requires_grad_(False)
    candidates = [Candidate(c["name"], tuple(c["shape"]), int(c["remaining_flops"])) for c in manifest["candidates"]]
    ee = EarlyExitModel(model, tuple(manifest["input_shape"]), manifest["num_classes"], candidates,
                        manifest["backbone_flops"])
    for name, info in manifest["heads"].items():
        head = build_head(info["spec"], tuple(info["shape"]), ee.num_classes)
        try:
            head.load_state_dict(states[name])
        except (KeyError, RuntimeError) as exc:
            raise BundleError(f"bundle {path}: weights of head {name!r} do not match its spec: {exc}") from exc
        ee.heads[name], ee.head_specs[name] = head.eval(), info["spec"]
        ee.temperatures[name], ee.head_flops[name] = info["temperature"], info["head_flops"]
    ee.gate = manifest.get("gate", "confidence")
    for name, spec in (manifest.get("gates") or {}).items():
        try:
            gate = build_gate(spec)
            gate.load_state_dict(states[f"gate:{name}"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise BundleError(f"bundle {path}: gate of exit {name!r} cannot be rebuilt: {exc}") from exc
        ee.gates[name] = gate.eval()
    if manifest.get("conformal"):
        ee.conformal = conformal.ConformalCalibration.from_dict(manifest["conformal"])
    ee.thresholds = {e["layer"]: float(e["threshold"]) for e in manifest["exits"]}
    ee.tolerance = manifest.get("tolerance")
    ee.provenance = Provenance.from_dict(manifest.get("provenance", manifest.get("meta")))
    return ee
