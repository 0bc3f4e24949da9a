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
"""
from __future__ import annotations

import copy

import torch
from torch import nn

DEFAULT_HEAD = {"kind": "pool_mlp", "pool": 4, "hidden": [256]}
NO_POOL = "none"  # a search space's pool choice: flatten the whole map
KINDS = ("pool_mlp", "conv_linear", "searched")


class TokenMean(nn.Module):
    """Average a [B, tokens, dim] sequence over its tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def _mlp(features: int, hidden: list[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return layers + [nn.Linear(features, num_classes)]


def _check_spec(spec: dict) -> dict:
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"head spec needs 'kind' in {KINDS}; got {spec!r}")
    allowed = {"pool_mlp": {"kind", "pool", "hidden"}, "conv_linear": {"kind", "convs", "pool", "hidden"},
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
    return spec


def build_head(spec: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Build a head for activations of per-sample shape ``in_shape`` (C,H,W), (tokens, dim) or (dim,)."""
    spec = concrete_spec(spec, tuple(in_shape))
    hidden = list(spec.get("hidden", []))
    if len(in_shape) == 1:
        return nn.Sequential(*_mlp(in_shape[0], hidden, num_classes))
    if len(in_shape) == 2:
        return nn.Sequential(TokenMean(), *_mlp(in_shape[1], hidden, num_classes))
    if len(in_shape) != 3:
        raise ValueError(f"cannot build a head for activation shape {in_shape}; expected (C,H,W), (tokens,dim) or (dim,)")
    channels, height, width = in_shape
    layers: list[nn.Module] = []
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
    if height % grid[0] == 0 and width % grid[1] == 0:  # same average, but a cheaper kernel at batch 1
        layers += [nn.AvgPool2d((height // grid[0], width // grid[1])), nn.Flatten()]
    else:
        layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
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
