"""Learned exit gates as modules: what the runtime runs and a bundle rebuilds (training: :mod:`selfxit.fit.gates`)."""
from __future__ import annotations

import torch
from torch import nn

GATES = ("confidence", "learned")
BASE_FEATURES = ("max_prob", "entropy", "entropy_t2", "margin", "log_odds")
PREVIOUS_FEATURES = ("previous_gap", "previous_prob")
_EPS = 1e-6



class Gate(nn.Module):
    """Exit probability from one exit's temperature-scaled logits (and the previous exit's probabilities).

    Features: max probability, entropy (nats), entropy at ``second_temperature``, top-1 minus top-2
    probability, log-odds of the max probability; with ``previous``: the previous exit's max probability
    minus its probability of this exit's top-1 (0 when they agree), and that probability. Their
    standardisation is folded
    into the first linear layer when training ends, so a forward pass is a handful of small ops.
    """

    _inv_t2: torch.Tensor  # non-persistent buffer
    _linear: nn.Linear | None  # self.net[0] when there is no hidden layer (not registered as a submodule)

    def __init__(self, num_classes: int, hidden: int = 0, second_temperature: float = 2.0, previous: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a gate needs at least 2 classes; got {num_classes}")
        self.num_classes, self.hidden = int(num_classes), int(hidden)
        self.second_temperature, self.previous = float(second_temperature), bool(previous)
        self.feature_names = BASE_FEATURES + (PREVIOUS_FEATURES if self.previous else ())
        width = len(self.feature_names)
        self.net = (nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if hidden
                    else nn.Sequential(nn.Linear(width, 1)))
        # tensor constants and a plain reference: fewer scalar conversions and lookups at batch 1
        self.register_buffer("_inv_t2", torch.tensor(1.0 / self.second_temperature), persistent=False)
        object.__setattr__(self, "_linear", None if hidden else self.net[0])

    def spec(self) -> dict:
        """JSON-friendly description that :func:`build_gate` rebuilds the module from."""
        return {"num_classes": self.num_classes, "hidden": self.hidden,
                "second_temperature": self.second_temperature, "previous": self.previous}

    def features(self, logits: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[B, features] in the order of ``feature_names``; ``previous`` is the previous exit's probabilities."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"gate expects logits of shape [batch, {self.num_classes}]; got {list(logits.shape)}")
        p = logits.softmax(dim=1)
        q = (logits * self._inv_t2).softmax(dim=1)
        top, index = p.topk(2, dim=1)
        p1 = top[:, :1]
        columns = [p1, torch.special.entr(p).sum(dim=1, keepdim=True), torch.special.entr(q).sum(dim=1, keepdim=True),
                   p1 - top[:, 1:], torch.logit(p1, _EPS)]
        if self.previous:
            if previous is None or previous.shape != logits.shape:
                raise ValueError("this gate reads the previous exit's output: pass its probabilities "
                                 f"[batch, {self.num_classes}]; got "
                                 f"{None if previous is None else list(previous.shape)}")
            ours = previous.gather(1, index[:, :1])
            columns += [previous.amax(dim=1, keepdim=True) - ours, ours]
        return torch.cat(columns, dim=1)

    def forward(self, logits: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[B] probability of exiting here."""
        features = self.features(logits, previous)
        if self._linear is not None:  # one fused op instead of nn.Linear's transpose + addmm (runs at batch 1)
            return torch.sigmoid(torch.addmv(self._linear.bias, features, self._linear.weight[0]))
        return torch.sigmoid(self.net(features)).squeeze(1)

    def flops(self) -> int:
        """FLOPs of one forward pass for one sample, counted analytically (an upper bound of the ops run).

        Per class: softmax (4), entropy (3: p log p and the sum), second-temperature scaling and softmax (5),
        its entropy (3), top-2 (2), previous exit's max (1): 18 per class; plus the scalar features (10),
        the linear layers (2 x MACs + bias), ReLU and the sigmoid (4).
        """
        width = len(self.feature_names)
        per_class = 17 + (1 if self.previous else 0)
        net = (2 * width * self.hidden + self.hidden + self.hidden + 2 * self.hidden + 1) if self.hidden \
            else (2 * width + 1)
        return per_class * self.num_classes + 10 + net + 4


def build_gate(spec: dict) -> Gate:
    """Rebuild a gate from :meth:`Gate.spec`."""
    allowed = {"num_classes", "hidden", "second_temperature", "previous"}
    if not isinstance(spec, dict) or set(spec) - allowed or "num_classes" not in spec:
        raise ValueError(f"gate spec needs 'num_classes' and only keys {sorted(allowed)}; got {spec!r}")
    return Gate(**spec)
