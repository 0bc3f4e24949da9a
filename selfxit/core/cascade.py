"""Chained exit heads (Zero Time Waste, Wolczyk et al., NeurIPS 2021, IC-only: the backbone stays frozen).

A chain is the ordered list of exits a cascade runs. Its ``k``-th head:

- reads, besides its layer's activation, the log-softmax of the previous chain member's own output
  (the *cascade connection*: a linear map of it is added to the head's first linear layer);
- answers with a weighted geometric ensemble of the chain so far:
  ``logits_k = sum_{j <= k} w_kj * log_softmax(own_j) + b_k`` with ``w_kj > 0`` (stored as ``log w``).

So an exit can only run after every earlier member of its chain ran on the same rows. The runtime carries
the stacked own log-softmaxes ``[k, rows, classes]`` of the chain for the surviving rows only (rows that
exit are dropped from it, exactly as from the batch).

**A chain member that the certified cascade turns off stays in the chain at its counted cost**: its
threshold is :data:`PASS_THROUGH`, which no max-softmax reaches, so it runs (its head's FLOPs are counted
like any active exit's) and hands its output on, but never answers. Retraining the chain without it would
change the later heads after their thresholds were certified.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from selfxit.core.heads import split_stem

PASS_THROUGH = 2.0  # threshold of a chain member that runs but never answers (max-softmax <= 1 < 2)


def is_chained(head: nn.Module) -> bool:
    """Whether ``head`` is a :class:`ChainedHead` (called with the chain, returning it)."""
    return isinstance(head, (ChainedHead, _ScaledChained))


def _first_linear(body: nn.Sequential) -> int | None:
    for i, module in enumerate(body):
        if isinstance(module, nn.Linear):
            return i
        if any(True for _ in module.parameters()):
            return None  # a conv before the first linear layer: no cascade connection (ensemble only)
    return None


class ChainedHead(nn.Module):
    """Exit head at ``position`` of a chain: ``head`` (a :func:`~selfxit.core.heads.build_head` module) with a
    cascade connection from the previous member and the ensemble over the chain so far.

    ``forward(x, chain)`` takes the layer's activation and the chain's stacked own log-softmaxes
    ``[position, B, C]`` (None at position 0) and returns ``(ensemble logits, chain with this head added)``.
    ``reads_previous`` is False at position 0, and for heads whose body does not start with a linear layer.
    """

    def __init__(self, head: nn.Module, num_classes: int, position: int, reads_previous: bool = True):
        super().__init__()
        self.head, self.position, self.num_classes = head, int(position), int(num_classes)
        self._parts = split_stem(cast(nn.Sequential, head))  # views of ``head``'s modules (a tuple: not registered twice)
        cut = _first_linear(self._parts[1])
        self.reads_previous = bool(reads_previous and position > 0 and cut is not None)
        self._cut = cut if cut is not None else 0
        self.previous: nn.Linear | None = None
        if self.reads_previous:
            first = cast(nn.Linear, self._parts[1][self._cut])
            self.previous = nn.Linear(num_classes, first.out_features, bias=False)
            nn.init.zeros_(self.previous.weight)  # starts as the plain head: training can only add to it
        log_w = torch.full((position + 1,), -3.0)
        log_w[-1] = 0.0  # starts as this head's own answer
        self.log_weights = nn.Parameter(log_w)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def config(self) -> dict:
        """What a bundle stores to rebuild this module around ``head`` (see :func:`from_config`)."""
        return {"position": self.position, "reads_previous": self.reads_previous}

    def body_from_features(self, features: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Own logits from the stem's output and the previous member's log-softmax (training and runtime)."""
        body = self._parts[1]
        if self.previous is None or previous is None:
            return body(features)
        z = body[self._cut](body[:self._cut](features)) + self.previous(previous)
        return body[self._cut + 1:](z)

    def own(self, x: torch.Tensor, chain: torch.Tensor | None) -> torch.Tensor:
        """This head's own log-softmax on activation ``x``, given the chain so far."""
        previous = chain[-1] if chain is not None and len(chain) else None
        return F.log_softmax(self.body_from_features(self._parts[0](x), previous), dim=1)

    def ensemble(self, chain: torch.Tensor) -> torch.Tensor:
        """Geometric ensemble logits from the chain's own log-softmaxes ``[position + 1, B, C]``."""
        return torch.einsum("k,kbc->bc", self.log_weights.exp(), chain) + self.bias

    def forward(self, x: torch.Tensor, chain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        have = 0 if chain is None else len(chain)
        if have != self.position:
            raise RuntimeError(f"chained head at position {self.position} got a chain of {have} earlier exits: every "
                               "earlier member of its chain must run first (keep them active, see PASS_THROUGH)")
        own = self.own(x, chain)[None]
        chain = own if chain is None else torch.cat([chain, own])
        return self.ensemble(chain), chain

    def extra_flops(self) -> int:
        """FLOPs on top of ``head``'s: the cascade connection and the ensemble (multiply-adds counted as 2)."""
        connection = 2 * self.num_classes * self.previous.out_features if self.previous is not None else 0
        return connection + 2 * (self.position + 1) * self.num_classes + 2 * self.num_classes

    def scaled(self, temperature: float) -> nn.Module:
        """This head with its ensemble logits divided by ``temperature`` (what the runtime runs)."""
        return _ScaledChained(self, temperature)


class _ScaledChained(nn.Module):
    def __init__(self, head: ChainedHead, temperature: float):
        super().__init__()
        self.inner, self.factor = head, 1.0 / float(temperature)

    def forward(self, x: torch.Tensor, chain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits, chain = self.inner(x, chain)
        return logits * self.factor, chain


def from_config(head: nn.Module, num_classes: int, config: dict) -> ChainedHead:
    """Rebuild a :class:`ChainedHead` around ``head`` from :meth:`ChainedHead.config` (bundle loading)."""
    try:
        return ChainedHead(head, num_classes, int(config["position"]), bool(config["reads_previous"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"chained head config {config!r} lacks or garbles {exc}") from None


def independent_of(head: nn.Module) -> nn.Module | None:
    """The independently trained head a chained head was built from, when it is still known (in the
    process that fitted it); the head itself if it is not chained. Fit reuses that one, never a chained head."""
    if isinstance(head, ChainedHead):
        return getattr(head, "_independent", [None])[0]
    return head


def head_outputs(heads: list[nn.Module], activations: list[torch.Tensor]) -> torch.Tensor:
    """[K, B, C] raw logits of every head on its full activation, in forward order, carrying the chain through
    the chained ones (what a no-shrink pass gives; the report records every trained head this way)."""
    chain, out = None, []
    for head, x in zip(heads, activations):
        if is_chained(head):
            logits, chain = head(x, chain)
        else:
            logits = head(x)
        out.append(logits)
    return torch.stack(out)
