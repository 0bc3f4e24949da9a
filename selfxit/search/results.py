"""A finished search as data: per-layer results, the kept heads as concrete specs, and how ``fit`` uses them.

Reading results needs no NNI, so ``enable --search`` and bundle loading work without the search extra.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from selfxit.core.heads import concrete_spec

FORMAT_VERSION = 1


@dataclass
class LayerResult:
    """The search at one candidate layer: its best trial (a history row) and whether the layer is kept."""

    layer: str
    shape: list[int]
    remaining_flops: int
    trials: int
    kept: bool
    reason: str
    majority: float
    best: dict | None
    seconds: float


@dataclass
class SearchResult:
    """A finished search: per-layer results; ``heads`` goes straight to ``EarlyExitModel.fit(heads=...)``."""

    out_dir: Path
    layers: list[LayerResult]
    heads: dict[str, dict] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def load_search(out_dir: str | Path) -> SearchResult:
    """The result of a finished search from its output folder."""
    path = Path(out_dir) / "best_heads.json"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} holds no finished search (no best_heads.json); run `selfxit search` first")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: search format {data.get('format_version')} != {FORMAT_VERSION}")
    layers = [LayerResult(**r) for r in data["layers"]]
    shapes = {r.layer: tuple(r.shape) for r in layers}
    try:  # searches written before concrete specs stored {"kind": "searched", "space", "choices"}
        heads = {name: concrete_spec(spec, shapes[name]) for name, spec in data["heads"].items()}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: a searched head cannot be rebuilt: {exc}") from exc
    return SearchResult(Path(out_dir), layers, heads, data["dropped"], sum(r["seconds"] for r in data["layers"]))


def apply_search(ee, out_dir: str | Path) -> dict[str, dict]:
    """Prepare ``ee`` for ``fit(heads=...)`` with a finished search: keep only the layers the search kept
    (dropped ones are near chance) and return their searched head specs."""
    result = load_search(out_dir)
    searched = {r.layer: tuple(r.shape) for r in result.layers}
    ours = {c.name: tuple(c.shape) for c in ee.candidates}
    if searched != ours:
        raise ValueError(f"{out_dir} was searched on candidates {searched}, but this model has {ours}: run the search "
                         "for this model (same --model, --weights and --max-candidates)")
    if not result.heads:
        raise ValueError(f"the search in {out_dir} kept no layer (all near chance); nothing to fit")
    ee.candidates = [c for c in ee.candidates if c.name in result.heads]
    return dict(result.heads)
