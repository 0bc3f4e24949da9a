"""Temperature scaling of exit heads, label-free: the target is the backbone's own top-1."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, backbone_top1: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature T > 0 minimizing the NLL of the backbone's top-1 under softmax(logits / T).

    After scaling, a head's max-softmax estimates the chance that it agrees with the backbone.
    """
    if len(logits) == 0:
        return 1.0
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, target = logits.detach().float(), backbone_top1.long()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return min(max(temperature, 1e-2), 1e2)


def expected_calibration_error(probs: torch.Tensor, backbone_top1: torch.Tensor, bins: int = 15) -> float:
    """ECE of max-softmax confidence against agreement with the backbone (equal-width bins)."""
    if len(probs) == 0:
        return 0.0
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == backbone_top1).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    return float(ece)
