"""The one-call entry points: ``wrap`` a frozen model, ``collect`` traffic, ``fit`` exits, run, save, ``load``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from selfxit.core import bundle as bundle_format
from selfxit.core.bucketed import RuntimeConfig
from selfxit.core.candidates import Candidate, find_candidates
from selfxit.core.engine import Engine, run_hooks_or_buckets
from selfxit.core.exits import CertifiedFamily, ExitRecord
from selfxit.core.flops import count_flops
from selfxit.core.provenance import Provenance
from selfxit.core.runtime import EarlyExitOutput, EarlyExitRunner
from selfxit.fit import conformal
from selfxit.fit.augment import AugmentConfig
from selfxit.fit.config import METHODS, FitConfig
from selfxit.fit.medial import SHARD_BYTES, MedialDataset
from selfxit.fit.medial.budget import DEFAULT_ROW_BUDGET
from selfxit.fit.procedure import fit_exits
from selfxit.fit.record import record
from selfxit.fit.results import CascadeSummary, FitReport, HeadReport

__all__ = ["EarlyExitModel", "wrap", "load", "FitConfig", "FitReport", "HeadReport", "CascadeSummary", "METHODS"]


class EarlyExitModel:
    """A frozen backbone with candidate exit layers, trained exit heads and the chosen cascade.

    Each trained head is one :class:`~selfxit.core.exits.ExitRecord` in ``records`` (forward order);
    the active ones (with a threshold) form the cascade. ``heads``, ``temperatures``, ``thresholds`` and
    the like are read-only views of those records.
    """

    def __init__(self, backbone: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                 candidates: list[Candidate], backbone_flops: int):
        self.backbone = backbone
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.candidates = list(candidates)
        self.backbone_flops = int(backbone_flops)
        self.medial: MedialDataset | None = None
        self.records: dict[str, ExitRecord] = {}
        self.gate = "confidence"  # what thresholds apply to: 'confidence' (max-softmax) or 'learned' gates
        self.conformal: conformal.ConformalCalibration | None = None
        self.tolerance: float | None = None
        self.report: FitReport | None = None
        self.config: FitConfig | None = None  # what the last fit used
        self.family: CertifiedFamily | None = None  # the certified thresholds' family (method 'certified')
        self.provenance = Provenance()  # how the bundle was built (model name, data split...), saved with it
        self._runner: EarlyExitRunner | None = None
        self._engine = Engine()  # runtime setting (hooks by default) and its bucketed runners

    # ---- recording -----------------------------------------------------------------------------
    def collect(self, data, out_dir: str | Path | None = None, seed: int = 0,
                augment_copies: int | AugmentConfig | dict = 2,
                batch_size: int = 128, num_workers: int = 0, progress: bool = True, *, heads=None,
                budget: int | None = DEFAULT_ROW_BUDGET, shard_mb: float = SHARD_BYTES / 2**20,
                rank_timeout: float | None = None) -> MedialDataset:
        """Record the medial dataset from unlabeled traffic, streaming it to shards in ``out_dir`` (a folder or
        any fsspec URL, e.g. ``s3://bucket/medial``; default: a temporary folder).

        ``data`` is a tensor of inputs, a sized Dataset, or a DataLoader over one in a fixed order (batches
        may be ``inputs`` or ``(inputs, labels, ...)``; labels are kept for reporting only).

        ``augment_copies``: the label-free copies of each *train* sample that the backbone labels for
        distillation: a number of flip/shift copies, or an :class:`~selfxit.fit.augment.AugmentConfig` (or a
        mapping of its keys) that adds mixup, cutmix and colour jitter. Tune/val/test rows stay clean.

        Each candidate stores what its heads consume (:mod:`selfxit.fit.medial.budget`), all together within
        ``budget`` bytes per row (default 512 KiB; None: no cap), checked before anything is recorded.
        ``heads`` are the head specs ``fit`` will train: one spec for all layers, ``{layer: spec}``, or
        ``'full'``; a conv head reads the full map unless its spec declares ``input_grid``. Default (None):
        full maps when they all fit the budget (small models: any head can be trained), else the default
        head's input (a 4x4 average grid of each conv map). Shards are cut at ``shard_mb`` MiB; memory does
        not grow with the traffic.

        Under ``torch.distributed`` (e.g. torchrun), call it on every rank with the same, whole ``data``:
        each rank records its share (samples ``rank::world``) into the one dataset, rank 0 finishes it, and
        every rank gets it back. ``rank_timeout`` (seconds) bounds the wait for the other ranks.
        """
        augment_copies = AugmentConfig.coerce(augment_copies)  # a bad setting fails before anything changes
        loader, num_samples = _as_loader(data, batch_size, num_workers)
        if num_samples < 10:
            raise ValueError(f"need at least 10 traffic samples to split train/val/test; got {num_samples}")
        if shard_mb <= 0:
            raise ValueError(f"shard_mb must be > 0; got {shard_mb!r}")
        loader = _rank_share(loader, num_samples, batch_size)
        out_dir = out_dir if out_dir else Path(tempfile.mkdtemp(prefix="selfxit-medial-"))
        self.backbone.eval()
        self.set_records([])  # heads belong to the medial dataset they were trained on
        self.medial = record(self.backbone, [c.name for c in self.candidates], [c.shape for c in self.candidates],
                             self.num_classes, loader, num_samples, out_dir, seed, augment_copies, progress,
                             heads=heads, budget=budget, shard_bytes=int(shard_mb * 2**20),
                             rank_timeout=rank_timeout)
        return self.medial

    # ---- training and optimization ---------------------------------------------------------------
    def fit(self, tolerance: float | None = None, config: FitConfig | None = None, *, progress: bool = True,
            warm_start: dict[str, nn.Module] | None = None, **settings) -> FitReport:
        """Train a head per candidate (KL to the backbone), calibrate, and choose exits and thresholds.

        ``config`` (a :class:`~selfxit.fit.config.FitConfig`, default ``FitConfig()``) holds every setting;
        ``tolerance`` and keyword ``settings`` (any FitConfig field: ``method``, ``delta``, ``max_exits``,
        ``gate``, ``heads``, ``distill``, ``gate_config``, ``retrain``...) override it. With
        ``method='certified'`` (default) the agreement drop on unseen traffic of the same distribution is
        at most the tolerance with probability >= 1 - delta; 'joint' and 'paper' only hold on the
        validation split. Heads already trained on this medial dataset with the same spec are reused
        unless ``retrain``. ``warm_start`` maps layer names to trained heads (e.g. the serving bundle's)
        that training starts from, where the spec matches.
        """
        config = config or FitConfig()
        if tolerance is not None:
            settings["tolerance"] = tolerance
        if settings.get("distill") is None:
            settings.pop("distill", None)
        if settings.get("gate_config") is None:
            settings.pop("gate_config", None)
        config = config.replace(**settings) if settings else config
        if self.medial is None:
            raise RuntimeError("no medial dataset: call collect(...) first")
        outcome = fit_exits(self.candidates, self.medial, self.num_classes, self.backbone_flops, config,
                            previous=self.records, warm_start=warm_start, progress=progress)
        self.gate = outcome.gate
        self.set_records(list(outcome.records.values()))
        self.conformal, self.report, self.tolerance, self.config = (outcome.calibration, outcome.report,
                                                                     config.tolerance, config)
        self.family = outcome.family
        return self.report

    def set_records(self, records: list[ExitRecord]) -> None:
        """Replace the exit records (kept in the backbone's forward order)."""
        order = {c.name: i for i, c in enumerate(self.candidates)}
        unknown = [r.layer for r in records if r.layer not in order]
        if unknown:
            raise ValueError(f"exit records for {unknown}, which are not candidates {list(order)}")
        self.records = {r.layer: r for r in sorted(records, key=lambda r: order[r.layer])}
        self._runner = None

    # read-only views of the records, one dict per field
    @property
    def heads(self) -> dict[str, nn.Module]:
        """Trained head per layer."""
        return {n: r.head for n, r in self.records.items()}

    @property
    def head_specs(self) -> dict[str, dict]:
        return {n: r.spec for n, r in self.records.items()}

    @property
    def head_flops(self) -> dict[str, int]:
        return {n: r.head_flops for n, r in self.records.items()}

    @property
    def temperatures(self) -> dict[str, float]:
        return {n: r.temperature for n, r in self.records.items()}

    @property
    def gates(self) -> dict[str, nn.Module]:
        """Learned gate per layer (``gate == 'learned'`` only)."""
        return {n: r.gate for n, r in self.records.items() if r.gate is not None}

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
        """Active exits and their thresholds, in forward order."""
        return {n: r.threshold for n, r in self.records.items() if r.threshold is not None}

    @thresholds.setter
    def thresholds(self, value: dict[str, float]) -> None:
        unknown = sorted(set(value) - set(self.records))
        if unknown:
            raise ValueError(f"thresholds for {unknown}, which have no trained head; trained: {list(self.records)}")
        for name, exit_record in self.records.items():
            exit_record.threshold = float(value[name]) if name in value else None
        self._runner = None  # the runner is built from the active exits

    @property
    def exits(self) -> list[ExitRecord]:
        """The active exits, in forward order."""
        missing = [n for n, r in self.records.items() if r.active and self.gate == "learned" and r.gate is None]
        if missing:
            raise ValueError(f"exits {missing} have no learned gate; gates were fitted for {list(self.gates)}")
        return [r for r in self.records.values() if r.active]

    def __call__(self, x: torch.Tensor, callback=None, shrink: bool = True,
                 prediction_sets: float | None = None) -> EarlyExitOutput:
        """Early-exit inference on a batch ``x`` of shape [B, *input_shape]; see :class:`EarlyExitRunner`.

        ``prediction_sets=alpha`` also returns, per sample, a conformal set of classes that contains the
        backbone's answer with probability >= 1 - alpha (alpha as calibrated by ``fit``: 0.01, 0.05, 0.1).
        """
        self.check_input(x)
        quantiles = None if prediction_sets is None else self.set_quantiles(prediction_sets)
        device = self.device
        if x.device != device:  # inputs come from the host; a model moved with to(device) takes them there
            x = x.to(device)
        out = run_hooks_or_buckets(self._engine, self._hook_runner, self.backbone, lambda: self.exits,
                                   self.num_classes, x, callback, shrink)
        if quantiles is not None:
            out.prediction_sets = conformal.prediction_sets(out.probabilities, out.exit, out.predictions, quantiles)
        return out

    def _hook_runner(self) -> EarlyExitRunner:
        if self._runner is None:
            self._runner = EarlyExitRunner(self.backbone, self.exits, self.num_classes)
        return self._runner

    # ---- runtime: hooks (default, bit-exact on CPU) or bucketed stages (compiled / CUDA graphs) ------------
    @property
    def runtime(self) -> RuntimeConfig:
        """How calls run (:class:`~selfxit.core.bucketed.RuntimeConfig`); set it to switch, e.g.
        ``ee.runtime = RuntimeConfig(engine="buckets", compile="cudagraph", max_batch=128)``."""
        return self._engine.config

    @runtime.setter
    def runtime(self, config: RuntimeConfig) -> None:
        self._engine = Engine(config)  # validated here: a bad ladder is refused before any batch

    def warm(self, plain: bool = False) -> list[int]:
        """Compile / capture every bucket of the bucketed runtime now (``plain``: the backbone baseline too);
        returns the warm buckets ([] on the hook runtime, which has nothing to warm)."""
        example = torch.zeros(1, *self.input_shape, device=self.device)
        return self._engine.warm(self.backbone, self.exits, self.num_classes, example, plain)

    @property
    def warm_buckets(self) -> list[int]:
        return self._engine.warm_buckets

    def no_fire(self):
        """``run(x)`` with every threshold above reach on this model's runtime: the no-fire worst case."""
        return self._engine.no_fire(self.backbone, self.exits, self.num_classes)

    def plain(self):
        """``run(x) -> logits``: the backbone run the way this model runs (bucketed: same buckets, same
        compiling), the baseline latency ratios are measured against."""
        return self._engine.plain(self.backbone, self.num_classes)

    @property
    def device(self) -> torch.device:
        first = next(iter(self.backbone.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    def to(self, device) -> "EarlyExitModel":
        """Move the backbone, heads and gates to ``device`` (runners are rebuilt there); says why it cannot."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"cannot move the model to {device}: no CUDA device here "
                               f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        self.backbone.to(device)
        for r in self.records.values():
            r.head.to(device)
            if r.gate is not None:
                r.gate.to(device)
        self._runner = None
        self._engine.forget()
        return self

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
        """Write the bundle (heads and gates as safetensors + manifest) atomically."""
        if not self.records:
            raise RuntimeError("nothing to save: call fit(...) first")
        return bundle_format.save_model(self, path)


def _rank_share(loader, num_samples: int, batch_size: int):
    """Under torch.distributed, a loader over this rank's share (samples rank, rank + world, ...) of the traffic."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loader
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        raise ValueError("collect divides the traffic between ranks itself: pass every rank the whole traffic "
                         "(a DataLoader without a DistributedSampler)")
    share = torch.utils.data.Subset(loader.dataset, range(dist.get_rank(), num_samples, dist.get_world_size()))
    return torch.utils.data.DataLoader(share, batch_size=loader.batch_size or batch_size,
                                       num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                       pin_memory=loader.pin_memory)


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

    Candidates are articulation points of the traced graph chosen by cost (:func:`~selfxit.core.candidates.
    candidate_table`: none in the first or last 5% of the FLOPs, at most ``max_candidates`` spread over the
    rest). FLOPs come from DeepSpeed's profiler, or torch's counter where DeepSpeed fails on the model. The
    model is put in eval mode with gradients off and is never modified otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 2 or not example_input.is_floating_point():
        raise ValueError("example_input must be a float tensor with a batch dimension, e.g. torch.zeros(1, 3, 32, 32)")
    model.eval().requires_grad_(False)
    out = _example_output(model, example_input)
    candidates = find_candidates(model, example_input[:1], max_candidates=max_candidates, names=candidate_layers)
    if not candidates:
        raise ValueError("no candidate exit layers found (selfxit.core.candidates.candidate_table(model, example_input), "
                         "or `selfxit candidates --all`, says why each layer was rejected); pass "
                         "candidate_layers=[module names]")
    total = count_flops(model, example_input[:1])
    return EarlyExitModel(model, tuple(example_input.shape[1:]), int(out.shape[1]), candidates, total)


def load(path: str | Path, model: nn.Module) -> EarlyExitModel:
    """Load a bundle for ``model``; refuses a bundle that was built for a different backbone."""
    model.eval().requires_grad_(False)
    contents = bundle_format.read_model(path, model)
    ee = EarlyExitModel(model, contents.input_shape, contents.num_classes, contents.candidates,
                        contents.backbone_flops)
    ee.set_records(contents.records)
    ee.gate, ee.conformal, ee.tolerance = contents.gate, contents.conformal, contents.tolerance
    ee.provenance, ee.family = contents.provenance, contents.family
    return ee
