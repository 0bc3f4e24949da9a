"""Where a bundle came from: a typed record saved in the manifest (replaces the free-form ``meta`` dict)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RetrainProvenance:
    """What the nightly job trained a published bundle on, and why it published it."""

    window_digest: str
    records: int
    holdout: int
    parent: str | None = None  # the version this bundle replaced
    window: list[float] = field(default_factory=list)  # [first, last] record timestamp
    current_check: dict | None = None  # the replaced bundle's figures on the held-back traffic
    candidate_check: dict | None = None  # this bundle's figures there


@dataclass
class Provenance:
    """How a bundle was built. Every field is optional: a bundle built from Python may know none of them.

    ``seed`` and ``max_samples`` (with ``num_samples``) let ``evaluate --split test`` find the held-back
    part of the data that ``enable`` used; ``version`` is set by the bundle store when it publishes.
    """

    model: str | None = None
    weights: str | None = None
    data: str | None = None
    seed: int | None = None
    max_samples: int | None = None
    num_samples: int | None = None
    search: str | None = None
    gate: str | None = None
    config: dict | None = None  # the FitConfig the bundle was fitted with
    version: str | None = None
    retrain: RetrainProvenance | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "Provenance":
        """Read a manifest's ``provenance`` (or a format-1 bundle's ``meta``); unknown keys are ignored."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        retrain = raw.get("retrain")
        if isinstance(retrain, dict):
            keys = {f.name for f in fields(RetrainProvenance)}
            try:
                raw["retrain"] = RetrainProvenance(**{k: v for k, v in retrain.items() if k in keys})
            except TypeError:
                raw["retrain"] = None  # an incomplete record from an older writer: not used for decisions
        return cls(**{k: v for k, v in raw.items() if k in known})
