"""Exit heads: small classifiers built from a JSON-friendly architecture spec.

A spec is a plain dict, so bundles and search results can store it and rebuild the module:

- ``{"kind": "pool_mlp", "pool": 4, "hidden": [256]}`` (the default): average-pool the activation
  to at most ``pool x pool`` (token sequences are averaged over tokens), then an MLP.
- ``{"kind": "conv_linear", "convs": [{"out": 32, "kernel": 3, "stride": 2}], "pool": 1,
  "hidden": [128]}``: conv-BN-ReLU layers, pooling, then an MLP (the SelfXit search space).
- ``{"kind": "searched", "space": {...}, "choices": {...}}``: how bundles and searches written before
  format 2 stored a searched head; read as the ``conv_linear`` spec of those choices
  (:func:`conv_linear_spec`), the same module NNI's freeze built. Searches now store the concrete spec.

Heads end in ``num_classes`` logits. Parameter-free leading modules (pooling) form the head's
``stem`` so that training can apply them once instead of every epoch.

**Input reduction.** A head's first op is the reduction of the activation that it consumes, and the
medial dataset stores exactly that reduction (:func:`input_reduction`, :func:`reducer`), so training on
stored rows and the runtime on live maps compute the same features:

- conv maps (C,H,W): ``{"reduce": "grid", "grid": [gh, gw]}``, average pooling to ``gh x gw``
  (:func:`grid_pool`: ``AvgPool2d`` when the sides divide, else ``AdaptiveAvgPool2d``). ``pool_mlp``
  (and ``conv_linear`` without convs) consume their pool grid; ``conv_linear`` with convs reads the full
  map unless it declares ``"input_grid": g`` (then it pools to at most g x g first and convolves that);
- token maps (tokens, dim): ``{"reduce": "tokens", "tokens": "mean"}`` (the default; a spec's
  ``"tokens": "cls_mean"`` keeps the first (class) token and the mean of the rest instead);
- ``{"reduce": "full"}``: the map as it is (vectors, and reductions that would not reduce).
"""
from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

DEFAULT_HEAD = {"kind": "pool_mlp", "pool": 4, "hidden": [256]}
NO_POOL = "none"  # a search space's pool choice: flatten the whole map
KINDS = ("pool_mlp", "conv_linear", "searched")
TOKEN_MODES = ("mean", "cls_mean")
FULL = {"reduce": "full"}


class TokenMean(nn.Module):
    """Average a [B, tokens, dim] sequence over its tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class TokenClsMean(nn.Module):
    """[B, tokens, dim] -> [B, 2 * dim]: the first (class) token, then the mean of the other tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=1)


def _mlp(features: int, hidden: list[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return layers + [nn.Linear(features, num_classes)]


def _check_spec(spec: dict) -> dict:
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"head spec needs 'kind' in {KINDS}; got {spec!r}")
    allowed = {"pool_mlp": {"kind", "pool", "hidden", "tokens"},
               "conv_linear": {"kind", "convs", "pool", "hidden", "tokens", "input_grid"},
               "searched": {"kind", "space", "choices"}}[spec["kind"]]
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"head spec {spec!r}: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
    pool = spec.get("pool", 1)
    if not isinstance(pool, int) or pool < 1:
        raise ValueError(f"head spec 'pool' must be a positive int; got {pool!r}")
    hidden = spec.get("hidden", [])
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ValueError(f"head spec 'hidden' must be positive ints; got {hidden!r}")
    grid = spec.get("input_grid")
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        raise ValueError(f"head spec 'input_grid' must be a positive int (pool the map to at most that grid before "
                         f"the convs) or absent (the full map); got {grid!r}")
    if spec.get("tokens", "mean") not in TOKEN_MODES:
        raise ValueError(f"head spec 'tokens' must be one of {TOKEN_MODES}; got {spec.get('tokens')!r}")
    return spec


def grid_pool(size: tuple[int, ...], grid: int | tuple[int, ...]) -> nn.Module:
    """Average pooling of an HxW map to at most ``grid`` (one int, or (rows, cols)): ``AvgPool2d`` when the
    sides divide (the same average with a cheaper kernel at batch 1), else ``AdaptiveAvgPool2d``.
    The one builder of this op, so a head's pooling and the medial dataset's stored reduction are the same op."""
    height, width = size
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = min(rows, height), min(cols, width)
    if height % rows == 0 and width % cols == 0:
        return nn.AvgPool2d((height // rows, width // cols))
    return nn.AdaptiveAvgPool2d((rows, cols))


def _grid_reduction(shape: tuple[int, ...], grid: int | tuple[int, ...]) -> dict:
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = min(rows, shape[1]), min(cols, shape[2])
    return dict(FULL) if (rows, cols) == tuple(shape[1:]) else {"reduce": "grid", "grid": [rows, cols]}


def check_reduction(reduction: dict, shape: tuple[int, ...]) -> dict:
    """``reduction`` checked against the activation ``shape`` and normalised (a grid that would not reduce the
    map, or any reduction of a vector, is ``FULL``)."""
    kind = reduction.get("reduce") if isinstance(reduction, dict) else None
    if kind == "full":
        return dict(FULL)
    if kind == "grid" and len(shape) == 3:
        grid = reduction.get("grid")
        if isinstance(grid, int):
            grid = [grid, grid]
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
            raise ValueError(f"grid reduction needs 'grid': [rows, cols] of positive ints; got {reduction!r}")
        return _grid_reduction(shape, tuple(grid))
    if kind == "tokens" and len(shape) == 2:
        if reduction.get("tokens") not in TOKEN_MODES:
            raise ValueError(f"token reduction needs 'tokens' in {TOKEN_MODES}; got {reduction!r}")
        return {"reduce": "tokens", "tokens": reduction["tokens"]}
    raise ValueError(f"cannot apply reduction {reduction!r} to an activation of shape {tuple(shape)}: use "
                     "{'reduce': 'grid', 'grid': [rows, cols]} for (C,H,W) maps, {'reduce': 'tokens', 'tokens': "
                     f"{'|'.join(TOKEN_MODES)}}} for (tokens, dim) sequences, or {{'reduce': 'full'}}")


def input_reduction(spec: dict, in_shape: tuple[int, ...]) -> dict:
    """The reduction of the activation that the head of ``spec`` computes first (see the module docs)."""
    spec = concrete_spec(spec, tuple(in_shape))
    if len(in_shape) == 2:
        return {"reduce": "tokens", "tokens": spec.get("tokens", "mean")}
    if len(in_shape) != 3:
        return dict(FULL)
    if spec.get("input_grid") is not None:
        return _grid_reduction(in_shape, spec["input_grid"])
    if spec["kind"] == "conv_linear" and spec.get("convs"):
        return dict(FULL)
    return _grid_reduction(in_shape, int(spec.get("pool", 1)))


def reduced_shape(shape: tuple[int, ...], reduction: dict) -> tuple[int, ...]:
    """Per-sample shape of ``reduction`` applied to an activation of ``shape``."""
    reduction = check_reduction(reduction, shape)
    if reduction["reduce"] == "grid":
        return (shape[0], *reduction["grid"])
    if reduction["reduce"] == "tokens":
        return (shape[1] * (2 if reduction["tokens"] == "cls_mean" else 1),)
    return tuple(shape)


def reducer(shape: tuple[int, ...], reduction: dict) -> nn.Module:
    """The module computing ``reduction`` on [B, *shape] activations: the same op as the first module of a head
    that consumes it (``nn.Identity`` for ``FULL``)."""
    reduction = check_reduction(reduction, shape)
    if reduction["reduce"] == "grid":
        return grid_pool(tuple(shape[1:]), tuple(reduction["grid"]))
    if reduction["reduce"] == "tokens":
        return TokenClsMean() if reduction["tokens"] == "cls_mean" else TokenMean()
    return nn.Identity()


def head_input(head: nn.Module, in_shape: tuple[int, ...]) -> tuple[dict, int]:
    """(the reduction ``head`` applies first to [B, *in_shape] activations, how many leading modules compute it),
    read from the module itself (built by :func:`build_head`)."""
    first = head[0] if isinstance(head, nn.Sequential) and len(head) else None
    if len(in_shape) == 3 and isinstance(first, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        with torch.no_grad():
            grid = tuple(first(torch.zeros(1, 1, *in_shape[1:])).shape[-2:])
        reduction = _grid_reduction(in_shape, grid)
        return reduction, 1
    if len(in_shape) == 2 and isinstance(first, (TokenMean, TokenClsMean)):
        return {"reduce": "tokens", "tokens": "cls_mean" if isinstance(first, TokenClsMean) else "mean"}, 1
    return dict(FULL), 0


def _composes(shape: tuple[int, ...], stored: dict, needed: dict) -> bool:
    """Whether average pooling to ``needed`` equals pooling the ``stored`` grid further (equal windows nest)."""
    if stored["reduce"] != "grid" or needed["reduce"] != "grid":
        return False
    (sh, sw), (nh, nw) = stored["grid"], needed["grid"]
    return shape[1] % sh == 0 and shape[2] % sw == 0 and sh % nh == 0 and sw % nw == 0


def can_feed(shape: tuple[int, ...], stored: dict, needed: dict) -> bool:
    """Whether activations stored under reduction ``stored`` give a head that consumes ``needed`` its input."""
    stored, needed = check_reduction(stored, shape), check_reduction(needed, shape)
    return stored["reduce"] == "full" or stored == needed or _composes(shape, stored, needed)


def describe_reduction(shape: tuple[int, ...], reduction: dict) -> str:
    """Human wording of a reduction, e.g. '4x4 average grid of the 512x28x28 map'."""
    reduction = check_reduction(reduction, shape)
    dims = "x".join(map(str, shape))
    if reduction["reduce"] == "grid":
        return f"{reduction['grid'][0]}x{reduction['grid'][1]} average grid of the {dims} map"
    if reduction["reduce"] == "tokens":
        what = "class token + mean of the other tokens" if reduction["tokens"] == "cls_mean" else "token mean"
        return f"{what} of the {dims} sequence"
    return f"full {dims} activation"


def stored_stage(head: nn.Module, in_shape: tuple[int, ...], stored: dict) -> nn.Module:
    """The part of ``head`` to apply to activations stored under reduction ``stored`` (modules shared with
    ``head``): ``head[1:]`` when the store holds exactly the head's input reduction, the whole head for full
    maps, an exact extra average pool when a stored grid nests into the head's. ValueError when the store
    cannot feed the head (it consumes finer features than were recorded)."""
    needed, skip = head_input(head, tuple(in_shape))
    stored = check_reduction(stored, tuple(in_shape))
    if stored["reduce"] == "full":
        return head
    rest = cast(nn.Sequential, head)[skip:] if skip else head  # skip > 0 only for an nn.Sequential
    if stored == needed:
        return rest
    if _composes(tuple(in_shape), stored, needed):
        (sh, sw), (nh, nw) = stored["grid"], needed["grid"]
        return nn.Sequential(nn.AvgPool2d((sh // nh, sw // nw)), rest)
    raise ValueError(f"this head consumes the {describe_reduction(in_shape, needed)}, but the medial dataset stored "
                     f"the {describe_reduction(in_shape, stored)}; collect again with this head spec in "
                     "collect(heads=...) (or heads='full'), or use a head whose input the store holds")


def build_head(spec: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Build a head for activations of per-sample shape ``in_shape`` (C,H,W), (tokens, dim) or (dim,)."""
    spec = concrete_spec(spec, tuple(in_shape))
    hidden = list(spec.get("hidden", []))
    if len(in_shape) == 1:
        return nn.Sequential(*_mlp(in_shape[0], hidden, num_classes))
    if len(in_shape) == 2:
        if spec.get("tokens", "mean") == "cls_mean":
            return nn.Sequential(TokenClsMean(), *_mlp(2 * in_shape[1], hidden, num_classes))
        return nn.Sequential(TokenMean(), *_mlp(in_shape[1], hidden, num_classes))
    if len(in_shape) != 3:
        raise ValueError(f"cannot build a head for activation shape {in_shape}; expected (C,H,W), (tokens,dim) or (dim,)")
    channels, height, width = in_shape
    layers: list[nn.Module] = []
    if spec.get("input_grid") is not None:  # declared input resolution: pool to it first (the stored reduction)
        layers.append(grid_pool((height, width), spec["input_grid"]))
        height, width = min(spec["input_grid"], height), min(spec["input_grid"], width)
    for conv in spec.get("convs", []) if spec["kind"] == "conv_linear" else []:
        out, kernel, stride = int(conv["out"]), int(conv.get("kernel", 3)), int(conv.get("stride", 1))
        side = min(height, width)  # both sides are checked: maps need not be square
        if kernel // 2 >= side or stride > side:
            raise ValueError(f"conv {conv} does not fit a {height}x{width} activation: its padding (kernel // 2 = "
                             f"{kernel // 2}) must be smaller than the map's smaller side ({side}) and its stride at "
                             f"most that side")
        layers += [nn.Conv2d(channels, out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
        height, width = conv_out(height, kernel, stride), conv_out(width, kernel, stride)
    pool = int(spec.get("pool", 1))
    grid = (min(pool, height), min(pool, width))
    layers += [grid_pool((height, width), grid), nn.Flatten()]
    return nn.Sequential(*layers, *_mlp(channels * grid[0] * grid[1], hidden, num_classes))


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv with padding ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def conv_linear_spec(choices: dict, in_shape: tuple[int, ...]) -> dict:
    """The ``conv_linear`` spec of one sample of a search space's choices (labels as in
    :mod:`selfxit.search.config`); ``pool`` 'none' flattens the whole remaining map."""
    try:
        convs = []
        if len(in_shape) == 3:
            height, width = in_shape[1], in_shape[2]
            for i in range(1, int(choices["conv_layers"]) + 1):
                kernel, stride = int(choices[f"conv{i}_kernel"]), int(choices[f"conv{i}_stride"])
                convs.append({"out": int(choices[f"conv{i}_channels"]), "kernel": kernel, "stride": stride})
                height, width = conv_out(height, kernel, stride), conv_out(width, kernel, stride)
            pool = max(height, width) if choices["pool"] == NO_POOL else int(choices["pool"])
        else:
            pool = 1
        hidden = [int(choices[f"linear{i}_width"]) for i in range(1, int(choices["linear_layers"]))]
    except KeyError as exc:
        raise ValueError(f"searched head choices lack {exc}; got {sorted(choices)}") from None
    return {"kind": "conv_linear", "convs": convs, "pool": pool, "hidden": hidden}


def concrete_spec(spec: dict, in_shape: tuple[int, ...]) -> dict:
    """``spec`` checked, with a legacy ``searched`` spec turned into its concrete ``conv_linear`` spec."""
    spec = _check_spec(copy.deepcopy(spec))
    if spec["kind"] == "searched":
        if not isinstance(spec.get("choices"), dict):
            raise ValueError(f"searched head spec needs a 'choices' mapping; got {spec.get('choices')!r}")
        spec = _check_spec(conv_linear_spec(spec["choices"], tuple(in_shape)))
    return spec


def split_stem(head: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """(leading parameter-free modules, the rest): the stem can be applied once to training data."""
    cut = 0
    for module in head:
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            break
        cut += 1
    return head[:cut], head[cut:]
