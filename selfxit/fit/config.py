"""``FitConfig``: every setting of ``EarlyExitModel.fit`` in one dataclass that maps 1:1 onto a YAML file.

A file holds the same keys as the dataclass (nested ``distill`` and ``gate_config`` sections hold the
fields of :class:`~selfxit.fit.distill.DistillConfig` and :class:`~selfxit.fit.gates.GateConfig`)::

    tolerance: 0.01          # allowed agreement drop against the backbone
    method: certified        # certified | joint | paper
    delta: 0.1               # the promise holds with probability >= 1 - delta
    max_exits: 4             # at most this many active exits (null: no cap)
    gate: confidence         # confidence | learned
    heads: null              # one head spec for every layer, or {layer: spec}; null: the default head
    near_chance_margin: 0.05 # heads within this of the majority-class rate are discarded (-1: keep all)
    design_factor: [1.0, 1.25, 1.5, 2.0]  # the shape is designed on 'tune' at these multiples of the tolerance
                             # (the one that certifies cheapest on 'tune' is kept; one number: that one only)
    retrain: false           # retrain heads already trained on this medial dataset
    cascade: false           # chain the designed exits: cascade connections + ensembles (selfxit.fit.cascade)
    survivor_rounds: 0       # with cascade: rounds of survivor-aware distillation, designed on 'tune'
    ensemble_split: train    # with cascade: where the chain's ensemble weights are fitted (train | tune)
    distill: {epochs: 15, batch_size: 256, lr: 0.005, weight_decay: 0.0005, seed: 0, temperature: 1.0}
    gate_config: {lam: inf, hidden: 0, ...}

Every key is validated here, at the boundary, and errors name the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from selfxit.fit.distill import DistillConfig
from selfxit.fit.gates import GATES, GateConfig
from selfxit.fit.select import DESIGN_FACTORS

METHODS = ("certified", "joint", "paper")
ENSEMBLE_SPLITS = ("train", "tune")  # 'val' never: it stays clean for the certification


class FitConfigError(ValueError):
    """A fit config that cannot be used; the message names the key."""


@dataclass
class FitConfig:
    """Settings of ``EarlyExitModel.fit`` (see the module docstring for the file format)."""

    tolerance: float = 0.01
    method: str = "certified"
    delta: float = 0.1
    max_exits: int | None = 4  # why 4: see the README's core-targets section (3 seeds, 3 vs 4 vs 5 vs no cap)
    gate: str = "confidence"
    heads: dict | None = None
    near_chance_margin: float = 0.05
    design_factor: float | tuple[float, ...] = DESIGN_FACTORS
    retrain: bool = False
    cascade: bool = False
    survivor_rounds: int = 0
    ensemble_split: str = "train"
    distill: DistillConfig = field(default_factory=DistillConfig)
    gate_config: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = _nested(DistillConfig, self.distill, "distill")
        if isinstance(self.gate_config, dict):
            self.gate_config = _nested(GateConfig, self.gate_config, "gate_config")
        if not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise FitConfigError(f"tolerance must be in (0, 1), e.g. 0.01 for a 1% agreement drop; got {self.tolerance!r}")
        if self.method not in METHODS:
            raise FitConfigError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.gate not in GATES:
            raise FitConfigError(f"gate must be one of {GATES}; got {self.gate!r}")
        if self.gate == "learned" and self.method != "certified":
            raise FitConfigError(f"gate='learned' needs method='certified' (gates and the cascade are designed on "
                                 f"'tune' and certified on 'val'); got method={self.method!r}")
        if not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise FitConfigError(f"delta must be in (0, 1); got {self.delta!r}")
        if self.max_exits is not None and (not isinstance(self.max_exits, int) or self.max_exits < 1):
            raise FitConfigError(f"max_exits must be a positive int or null; got {self.max_exits!r}")
        if self.heads is not None and not isinstance(self.heads, dict):
            raise FitConfigError(f"heads must be a head spec or {{layer: spec}}; got {self.heads!r}")
        if not isinstance(self.near_chance_margin, (int, float)) or not -1 <= self.near_chance_margin < 1:
            raise FitConfigError(f"near_chance_margin must be in [-1, 1) (-1 keeps every head); "
                                 f"got {self.near_chance_margin!r}")
        self.design_factor = _design_factor(self.design_factor)
        if not isinstance(self.retrain, bool):
            raise FitConfigError(f"retrain must be true or false; got {self.retrain!r}")
        if not isinstance(self.cascade, bool):
            raise FitConfigError(f"cascade must be true or false; got {self.cascade!r}")
        if self.cascade and self.gate != "confidence":
            raise FitConfigError(f"cascade=true needs gate='confidence' (chained exits answer by max-softmax); "
                                 f"got gate={self.gate!r}")
        if isinstance(self.survivor_rounds, bool) or not isinstance(self.survivor_rounds, int) \
                or not 0 <= self.survivor_rounds <= 10:
            raise FitConfigError(f"survivor_rounds must be an int in [0, 10]; got {self.survivor_rounds!r}")
        if self.ensemble_split not in ENSEMBLE_SPLITS:
            raise FitConfigError(f"ensemble_split must be one of {ENSEMBLE_SPLITS}; got {self.ensemble_split!r}")
        if self.survivor_rounds and not self.cascade:
            raise FitConfigError("survivor_rounds > 0 needs cascade=true (the rounds retrain the chain's heads)")

    def to_dict(self) -> dict:
        """The config as plain JSON/YAML data (``lam`` = inf is written as the string 'inf')."""
        out = asdict(self)
        if isinstance(out["design_factor"], tuple):
            out["design_factor"] = list(out["design_factor"])
        lam = out["gate_config"]["lam"]
        out["gate_config"]["lam"] = "inf" if math.isinf(lam) else lam
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "fit config") -> "FitConfig":
        """Build from plain data; unknown keys are refused with the list of allowed ones."""
        if not isinstance(raw, dict):
            raise FitConfigError(f"{source}: expected a mapping of settings; got {type(raw).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise FitConfigError(f"{source}: unknown keys {unknown}; allowed: {allowed}")
        try:
            return cls(**raw)
        except FitConfigError as exc:
            raise FitConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise FitConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "FitConfig":
        """Read a YAML (or JSON) file with the keys of this dataclass."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fit config {path} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise FitConfigError(f"{path} is not valid YAML: {exc}") from None
        return cls.from_dict(raw if raw is not None else {}, source=str(path))

    def replace(self, **changes) -> "FitConfig":
        """A copy with ``changes`` applied (validated like the constructor)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(changes) - set(data))
        if unknown:
            raise FitConfigError(f"unknown fit settings {unknown}; allowed: {sorted(data)}")
        data.update(changes)
        return type(self)(**data)


def _design_factor(value: Any) -> float | tuple[float, ...]:
    """A number >= 1, or a non-empty list of them (kept as a tuple)."""
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 1

    if ok(value):
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(ok(v) for v in value):
        return tuple(float(v) for v in value)
    raise FitConfigError(f"design_factor must be a number >= 1 or a non-empty list of them (the shape is designed "
                         f"at design_factor x tolerance); got {value!r}")


def _nested(cls, raw: dict, key: str):
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise FitConfigError(f"{key}: unknown keys {unknown}; allowed: {allowed}")
    values = dict(raw)
    if values.get("lam") == "inf":
        values["lam"] = math.inf
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise FitConfigError(f"{key}: {exc}") from None
