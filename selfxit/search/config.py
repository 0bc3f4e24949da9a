"""Search configs for exit heads: YAML/JSON files, validated into dataclasses (no NNI needed).

A search config names the head space, the NNI strategy, the trial budget per candidate layer, how each
trial trains its head and the objective. The shipped configs live in ``selfxit/search/spaces/`` (copies to
read at the top-level ``search_spaces/``); ``load_config("conv_linear")`` finds them by name. Every key is
checked before any training starts.

Choice labels: ``conv_layers``; ``conv<i>_channels``, ``conv<i>_kernel``, ``conv<i>_stride`` for each
conv position i; ``pool``; ``linear_layers`` (linear layers including the final one to the classes);
``linear<i>_width`` for each hidden linear position i. Positions past the chosen depth are ignored.
A sample of choices maps to a concrete ``conv_linear`` head spec (:meth:`SpaceConfig.spec`), which is
what search results and bundles store.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfxit.core.heads import NO_POOL, conv_linear_spec, conv_out
from selfxit.extras import require_extra

SHIPPED_DIR = Path(__file__).resolve().parent / "spaces"  # package data, installed with selfxit
STRATEGIES = {"random": "Random", "grid": "GridSearch", "evolution": "RegularizedEvolution", "tpe": "TPE"}
VALIDATION_SPLITS = ("tune", "val")
TRAINING_SERVICE_PLATFORMS = ("local", "remote", "openpai", "kubeflow", "frameworkcontroller", "aml", "dlc")
_LIMITS = {  # per space key: (smallest, largest) allowed value, and what it means
    "conv_layers": (0, 4), "channels": (1, 4096), "kernel": (1, 7), "stride": (1, 4),
    "pool": (1, 64), "linear_layers": (1, 4), "width": (1, 8192),
}


class SearchConfigError(ValueError):
    """A search config that does not parse or names unknown keys or values."""


# ---- config dataclasses --------------------------------------------------------------------------------------

@dataclass
class SpaceConfig:
    """Choices of the head space: conv-BN-ReLU layers, pooling, then linear layers ending in the classes."""

    conv_layers: list[int] = field(default_factory=lambda: [0])
    channels: list[int] = field(default_factory=list)
    kernel: list[int] = field(default_factory=list)
    stride: list[int] = field(default_factory=list)
    pool: list[int | str] = field(default_factory=lambda: [1])
    linear_layers: list[int] = field(default_factory=lambda: [1])
    width: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The choice lists that are set (unused conv/width keys of conv-free or single-linear spaces left out)."""
        return {key: list(values) for key, values in asdict(self).items() if values}

    def labels(self, in_shape: tuple[int, ...]) -> dict[str, list]:
        """The labelled choices for an activation of per-sample shape ``in_shape`` (convs/pool need (C,H,W))."""
        out: dict[str, list] = {}
        if len(in_shape) == 3:
            out["conv_layers"] = list(self.conv_layers)
            for i in range(1, max(self.conv_layers) + 1):
                out[f"conv{i}_channels"], out[f"conv{i}_kernel"] = list(self.channels), list(self.kernel)
                out[f"conv{i}_stride"] = list(self.stride)
            out["pool"] = list(self.pool)
        out["linear_layers"] = list(self.linear_layers)
        for i in range(1, max(self.linear_layers)):
            out[f"linear{i}_width"] = list(self.width)
        return out

    def middle(self, in_shape: tuple[int, ...]) -> dict[str, Any]:
        """The middle value of every choice list: one fixed head of this space, used as the no-NAS baseline."""
        return {label: values[len(values) // 2] for label, values in self.labels(in_shape).items()}

    def cheapest(self, in_shape: tuple[int, ...]) -> dict[str, Any]:
        """The choices of the least-FLOPs head: fewest, narrowest layers, largest strides, smallest pool grid."""
        labels = self.labels(in_shape)
        pick = {"channels": min, "kernel": min, "stride": max, "width": min}
        out = {label: pick.get(label.split("_", 1)[-1], min)(values) for label, values in labels.items()
               if label != "pool"}
        if "pool" in labels:
            grids = [v for v in labels["pool"] if v != NO_POOL]
            out["pool"] = min(grids) if grids else NO_POOL
        return out

    def spec(self, choices: dict[str, Any], in_shape: tuple[int, ...]) -> dict:
        """The concrete ``conv_linear`` head spec (see :mod:`selfxit.core.heads`) for one sample of choices."""
        return conv_linear_spec(choices, in_shape)

    def check_fits(self, name: str, in_shape: tuple[int, ...]) -> None:
        """Raise if some choice cannot be built on candidate ``name``'s activation (impossible shapes)."""
        if len(in_shape) != 3:
            if max(self.conv_layers) > 0:
                raise SearchConfigError(
                    f"space.conv_layers: candidate {name!r} has activation shape {tuple(in_shape)} without a spatial "
                    f"grid, so conv layers cannot be built; use conv_layers: [0] (e.g. search_spaces/linear.yaml)")
            return
        height = min(in_shape[1], in_shape[2])
        for depth in range(1, max(self.conv_layers) + 1):
            stride = max(self.stride)
            if stride > height:
                raise SearchConfigError(
                    f"space.stride: stride {stride} does not fit the {height}-pixel side left after {depth - 1} conv "
                    f"layer(s) at candidate {name!r} (activation {tuple(in_shape)}); allowed here: strides <= {height} "
                    f"or fewer conv_layers")
            height = conv_out(height, max(self.kernel), stride)


@dataclass
class TrainingConfig:
    """How each trial trains its head: KL to the backbone on a seeded subsample of the medial train split."""

    epochs: int = 4
    max_rows: int = 3000
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    validation_split: str = "tune"


@dataclass
class ObjectiveConfig:
    """score = agreement - flops_weight * head_flops / remaining_flops (see :mod:`selfxit.search.run`)."""

    flops_weight: float = 1.0
    max_head_flops: float | None = 0.05  # heads over this fraction of the layer's remaining FLOPs are not trained
    drop_margin: float = 0.05  # drop a layer whose best agreement is below majority rate + this


@dataclass
class SearchConfig:
    """A whole search config file, validated."""

    space: SpaceConfig
    strategy: str = "random"
    strategy_options: dict = field(default_factory=dict)
    trials_per_layer: int = 20
    seed: int = 0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training_service: dict | None = None
    trial_concurrency: int = 1

    def to_dict(self) -> dict:
        """Plain JSON-friendly form; ``SearchConfig.from_dict(c.to_dict())`` gives the same config."""
        out = asdict(self)
        out["space"] = self.space.to_dict()
        out["strategy"] = {"name": out.pop("strategy"), "options": out.pop("strategy_options")}
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "search config") -> "SearchConfig":
        """Validate a parsed config; errors name the bad key and the allowed keys or values."""
        top = _mapping(raw, "", source)
        _known(top, ("space", "strategy", "trials_per_layer", "seed", "training", "objective", "training_service",
                     "trial_concurrency"), "", source)
        if "space" not in top:
            raise SearchConfigError(f"{source}: key 'space' is required (the head choices, see search_spaces/)")
        space = _space(top["space"], source)
        strategy, options = _strategy(top.get("strategy", "random"), source)
        training = _section(top.get("training", {}), TrainingConfig, "training", source)
        objective = _section(top.get("objective", {}), ObjectiveConfig, "objective", source)
        config = cls(space, strategy, options,
                     _int(top.get("trials_per_layer", 20), "trials_per_layer", source, 1, 100_000),
                     _int(top.get("seed", 0), "seed", source, 0, 2**31 - 1), training, objective,
                     _training_service(top.get("training_service"), source),
                     _int(top.get("trial_concurrency", 1), "trial_concurrency", source, 1, 10_000))
        if config.trial_concurrency > 1 and config.training_service is None:
            raise SearchConfigError(f"{source}: trial_concurrency > 1 needs a training_service section; "
                                    "the in-process engine runs one trial at a time")
        build_strategy(config)  # strategy options are checked by constructing it, before any training
        return config


# ---- parsing and validation ----------------------------------------------------------------------------------

def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``selfxit/search/spaces/<name>.yaml``)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def load_config(config: str | Path | dict | SearchConfig) -> SearchConfig:
    """A validated :class:`SearchConfig` from a YAML/JSON file path, the name of a shipped config
    (``'conv_linear'``, ``'linear'``), a parsed dict, or a config (returned as is)."""
    if isinstance(config, SearchConfig):
        return config
    if isinstance(config, dict):
        return SearchConfig.from_dict(config)
    path = Path(config)
    if not path.is_file():
        shipped = SHIPPED_DIR / f"{path.name}.yaml" if not path.suffix else SHIPPED_DIR / path.name
        if len(path.parts) == 1 and shipped.is_file():  # a shipped config by name: 'conv_linear'
            path = shipped
        else:
            raise FileNotFoundError(f"search config {path} not found; shipped configs (pass the name): "
                                    f"{', '.join(shipped_configs())}")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SearchConfigError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                                    f"{exc.msg}") from exc
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SearchConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    else:
        raise SearchConfigError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml or .json")
    return SearchConfig.from_dict(raw, source=str(path))


def _where(key: str, source: str) -> str:
    return f"{source}: key '{key}'" if key else source


def _mapping(value: Any, key: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise SearchConfigError(f"{_where(key, source)} must be a mapping of keys to values; got {value!r}")
    return value


def _known(section: dict, allowed: tuple[str, ...], prefix: str, source: str) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SearchConfigError(f"{source}: unknown key '{prefix}{key}'{hint}; allowed keys: {', '.join(allowed)}")


def _int(value: Any, key: str, source: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SearchConfigError(f"{_where(key, source)} must be an integer in [{low}, {high}]; got {value!r}")
    return value


def _number(value: Any, key: str, source: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or \
            (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise SearchConfigError(f"{_where(key, source)} must be a number in {interval}; got {value!r}")
    return float(value)


def _choices(section: dict, key: str, source: str) -> list:
    values = section[key]
    name = f"space.{key}"
    if not isinstance(values, list) or not values:
        raise SearchConfigError(f"{_where(name, source)} must be a non-empty list of choices, e.g. [1, 3, 5]; "
                                f"got {values!r}")
    low, high = _LIMITS[key]
    for v in values:
        if key == "pool" and v == NO_POOL:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high or (key == "kernel" and v % 2 == 0):
            allowed = {"kernel": "odd integers 1, 3, 5, 7", "pool": f"integers {low}..{high} (output grid side) or "
                       f"'{NO_POOL}' (no pooling)"}.get(key, f"integers {low}..{high}")
            raise SearchConfigError(f"{_where(name, source)}: unknown choice {v!r}; allowed values: {allowed}")
    if len(set(map(str, values))) != len(values):
        raise SearchConfigError(f"{_where(name, source)} lists a choice twice: {values!r}")
    return list(values)


def _space(raw: Any, source: str) -> SpaceConfig:
    section = _mapping(raw, "space", source)
    allowed = tuple(SpaceConfig.__dataclass_fields__)
    _known(section, allowed, "space.", source)
    values = {key: _choices(section, key, source) for key in allowed if key in section}
    space = SpaceConfig(**values)
    needs = []
    if max(space.conv_layers) > 0:
        needs += [k for k in ("channels", "kernel", "stride") if k not in values]
    if max(space.linear_layers) > 1 and "width" not in values:
        needs.append("width")
    if needs:
        raise SearchConfigError(f"{source}: key(s) {', '.join('space.' + k for k in needs)} required: "
                                f"conv_layers {space.conv_layers} / linear_layers {space.linear_layers} allow "
                                "layers that need them")
    return space


def _strategy(raw: Any, source: str) -> tuple[str, dict]:
    if isinstance(raw, str):
        raw = {"name": raw}
    section = _mapping(raw, "strategy", source)
    _known(section, ("name", "options"), "strategy.", source)
    name = section.get("name")
    if name not in STRATEGIES:
        raise SearchConfigError(f"{_where('strategy.name', source)}: unknown strategy {name!r}; allowed values: "
                                f"{', '.join(STRATEGIES)}")
    options = _mapping(section.get("options") or {}, "strategy.options", source)
    return name, dict(options)


def _section(raw: Any, cls, name: str, source: str):
    section = _mapping(raw if raw is not None else {}, name, source)
    allowed = tuple(cls.__dataclass_fields__)
    _known(section, allowed, f"{name}.", source)
    values = {**asdict(cls()), **section}
    key = lambda k: f"{name}.{k}"  # noqa: E731
    if cls is TrainingConfig:
        if values["validation_split"] not in VALIDATION_SPLITS:
            raise SearchConfigError(f"{_where(key('validation_split'), source)}: unknown split "
                                    f"{values['validation_split']!r}; allowed values: {', '.join(VALIDATION_SPLITS)}")
        return TrainingConfig(_int(values["epochs"], key("epochs"), source, 1, 1000),
                              _int(values["max_rows"], key("max_rows"), source, 1, 10**9),
                              _int(values["batch_size"], key("batch_size"), source, 1, 65536),
                              _number(values["lr"], key("lr"), source, 0, 10, low_open=True),
                              _number(values["weight_decay"], key("weight_decay"), source, 0, 10),
                              values["validation_split"])
    cap = values["max_head_flops"]
    return ObjectiveConfig(_number(values["flops_weight"], key("flops_weight"), source, 0, 1000),
                           None if cap is None else _number(cap, key("max_head_flops"), source, 0, 1, low_open=True),
                           _number(values["drop_margin"], key("drop_margin"), source, 0, 1))


def _training_service(raw: Any, source: str) -> dict | None:
    if raw is None:
        return None
    section = _mapping(raw, "training_service", source)
    platform = section.get("platform")
    if platform not in TRAINING_SERVICE_PLATFORMS:
        raise SearchConfigError(f"{_where('training_service.platform', source)}: unknown platform {platform!r}; "
                                f"allowed values: {', '.join(TRAINING_SERVICE_PLATFORMS)}")
    from nni.experiment.config import training_services
    classes = {getattr(c, "__dataclass_fields__", {}).get("platform").default: c
               for c in vars(training_services).values()
               if isinstance(c, type) and "platform" in getattr(c, "__dataclass_fields__", {})}
    try:  # NNI's own config class checks the field names and types of the section
        classes[platform](**section)
    except (AttributeError, TypeError, ValueError) as exc:
        raise SearchConfigError(f"{_where('training_service', source)}: NNI rejects the {platform!r} section: "
                                f"{exc}") from exc
    return dict(section)


def build_strategy(config: SearchConfig, seed_offset: int = 0):
    """A fresh NNI strategy for one experiment, from ``config.strategy`` and its options, seeded by
    ``config.seed + seed_offset`` (the search offsets it per layer, so layers explore different samples)."""
    require_extra("search", "search strategies")
    os.environ.setdefault("NNI_FRAMEWORK", "none")  # before nni.nas: no pytorch-lightning import
    from nni.nas import strategy as nni_strategy
    cls = getattr(nni_strategy, STRATEGIES[config.strategy])
    options = dict(config.strategy_options)
    for fixed in ("seed", "optimize_mode"):
        if fixed in options:
            raise SearchConfigError(f"strategy.options.{fixed} is set by selfxit (use the top-level 'seed'; "
                                    "the objective is always maximised)")
    if config.strategy == "tpe":
        from nni.algorithms.hpo.tpe_tuner import TpeTuner
        allowed = [p for p in inspect.signature(TpeTuner).parameters if p not in ("optimize_mode", "seed")]
        options.update(optimize_mode="maximize")
    else:
        allowed = [p for p, v in inspect.signature(cls).parameters.items()
                   if v.kind == v.KEYWORD_ONLY and p != "seed"]
    unknown = sorted(set(config.strategy_options) - set(allowed))
    if unknown:
        raise SearchConfigError(f"strategy.options: unknown option(s) {unknown} for strategy {config.strategy!r}; "
                                f"allowed: {', '.join(allowed) or 'none'}")
    try:
        return cls(seed=config.seed + seed_offset, **options)
    except (TypeError, ValueError) as exc:
        raise SearchConfigError(f"strategy.options {config.strategy_options}: NNI rejects them: {exc}") from exc


def check_choices(space: SpaceConfig, choices: Any, in_shape: tuple[int, ...]) -> dict:
    """Raise a clear error unless ``choices`` gives an allowed value for exactly the space's labels."""
    labels = space.labels(tuple(in_shape))
    if not isinstance(choices, dict):
        raise ValueError(f"searched head 'choices' must be a mapping {{label: value}}; got {choices!r}")
    missing, unknown = sorted(set(labels) - set(choices)), sorted(set(choices) - set(labels))
    if missing or unknown:
        raise ValueError(f"searched head choices do not match the space for activation {tuple(in_shape)}: "
                         f"missing {missing}, unknown {unknown}; labels are {sorted(labels)}")
    for label, value in choices.items():
        if value not in labels[label]:
            raise ValueError(f"searched head choice {label}={value!r} is not allowed; allowed values: {labels[label]}")
    return choices


def searched_spec(space: SpaceConfig, choices: dict, in_shape: tuple[int, ...]) -> dict:
    """The concrete head spec that search results and bundles store for one sample of ``space`` (validated)."""
    return space.spec(check_choices(space, choices, tuple(in_shape)), tuple(in_shape))
