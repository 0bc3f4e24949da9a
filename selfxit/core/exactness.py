"""How small a batch may get before the backbone's answers change in their last bits.

CPU kernels pick their code path by problem size: oneDNN runs a batch of one differently, and GEMM
libraries use other blockings for small M (on the machines this was written on, the linear layer of a
CIFAR ResNet gives other bits at batches 1 and 2 than at 3 or more; elsewhere it was batch 1 alone). The
values are equally good; they are just not the same, and selfxit promises that a sample no exit
answers gets the backbone's own answer bit for bit. So the runtime measures, per input shape, the
smallest batch size from which every row comes out as in a larger batch, and never lets survivors run in
a smaller one.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

PROBE_ROWS = 8  # sizes probed: 1 .. PROBE_ROWS, each against a batch twice that size


@torch.inference_mode()
def invariant_rows(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
                   limit: int = PROBE_ROWS) -> int:
    """The smallest m <= ``limit`` such that for every size from m to ``limit`` the backbone's output rows equal
    those of the same inputs inside a batch of ``2 * limit`` (bit for bit).

    ``example`` is one input row ([1, ...]); the probe uses seeded random inputs of its shape, dtype and device
    (code paths depend on shapes, not values) and leaves the caller's RNG alone. Off the CPU, where kernels are
    not bit-stable across batch sizes anyway (the promise there is the backbone's top-1), it returns 2. When
    no size up to ``limit`` is stable (EfficientNet-Lite0 here: its rows change at every batch size), padding
    cannot buy exactness, so it warns and returns 2, the smallest size that avoids the batch-of-one paths.
    """
    if example.device.type != "cpu":
        return 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2 * limit, *example.shape[1:]), generator=generator).to(example.dtype)
    reference = forward(x)
    stable = limit + 1
    for m in range(limit, 0, -1):
        if not torch.equal(forward(x[:m]), reference[:m]):
            break
        stable = m
    if stable > limit:
        warnings.warn(f"the backbone's rows change in their last bits with the batch size (every size up to {limit} "
                      "tried), so samples no exit answers get the backbone's answer up to those bits, not bit for bit",
                      RuntimeWarning, stacklevel=3)
        return 2
    return stable
