"""Temperature scaling of exit heads, label-free: the target is the backbone's own top-1."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, backbone_top1: torch.Tensor, max_iter: int = 100,
                    chunk: int = 256) -> float:
    """Temperature T > 0 minimizing the NLL of the backbone's top-1 under softmax(logits / T).

    After scaling, a head's max-softmax estimates the chance that it agrees with the backbone. Each LBFGS
    step sums the loss over ``chunk`` rows at a time, so its temporaries stay [chunk, classes] however many
    rows there are (the same loss; one chunk when there are at most ``chunk`` rows). The loss is computed
    in float64: the NLL is flat near its minimum, and in float32 its rounding moved the optimum by up to
    1e-3 relative with the summation order (chunked or not), enough to flip a threshold design downstream.
    """
    if len(logits) == 0:
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, target = logits.detach(), backbone_top1.long()
    n = len(logits)

    def closure():
        optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, chunk):
            part = F.cross_entropy(logits[start:start + chunk].double() / log_t.exp(), target[start:start + chunk],
                                   reduction="sum" if n > chunk else "mean")
            if n > chunk:
                part = part / n
            part.backward()
            total = total + part.detach()
        return total

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, 1e-2), 1e2)


class CalibrationBins:
    """Per-bin sums of max-softmax confidence and of agreement with the backbone (equal-width bins), filled
    chunk by chunk: the ECE of every row added, without holding their probabilities at once."""

    def __init__(self, bins: int = 15):
        self.edges = torch.linspace(0, 1, bins + 1)
        self.rows = 0
        self._count = torch.zeros(bins, dtype=torch.float64)
        self._confidence = torch.zeros(bins, dtype=torch.float64)
        self._agree = torch.zeros(bins, dtype=torch.float64)

    def add(self, probs: torch.Tensor, backbone_top1: torch.Tensor) -> None:
        """Add rows: ``probs`` [n, C] (a head's softmax), ``backbone_top1`` [n]."""
        confidence, prediction = probs.max(dim=1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        bins = len(self._count)
        # bin b holds edges[b] < confidence <= edges[b + 1]; a confidence of 0 (or above 1) is in no bin
        index = torch.bucketize(confidence, self.edges) - 1
        inside = (index >= 0) & (index < bins)
        index = index[inside]
        self._count += torch.bincount(index, minlength=bins).double()
        self._confidence += torch.bincount(index, confidence[inside].double(), minlength=bins)
        self._agree += torch.bincount(index, (prediction == backbone_top1)[inside].double(), minlength=bins)
        self.rows += len(probs)

    def error(self) -> float:
        """ECE: sum over bins of (bin share) x |mean confidence - agreement| = sum |S_conf - S_agree| / rows."""
        return float((self._confidence - self._agree).abs().sum() / self.rows) if self.rows else 0.0


def expected_calibration_error(probs: torch.Tensor, backbone_top1: torch.Tensor, bins: int = 15) -> float:
    """ECE of max-softmax confidence against agreement with the backbone (equal-width bins)."""
    acc = CalibrationBins(bins)
    acc.add(probs, backbone_top1)
    return acc.error()
