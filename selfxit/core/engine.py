"""Which runtime an early-exit model runs, and the runners built for it, kept across calls.

Why a separate piece: the bucketed runtime compiles or captures its steps once per bucket, so its runner
must outlive a threshold change (a live guard moves thresholds between batches) and be shared by the
runs a timing compares (the no-fire worst case, the backbone run the same way). The hook runtime stays
what :class:`~selfxit.api.EarlyExitModel` builds by default.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from selfxit.core.bucketed import BucketedRunner, RuntimeConfig
from selfxit.core.exits import ExitRecord
from selfxit.core.runtime import EarlyExitOutput, EarlyExitRunner

NEVER = 2.0  # a threshold above reach: max-softmax and gate scores are at most 1


class Engine:
    """The runtime setting of one model, with its bucketed runners (built on first use, then reused)."""

    def __init__(self, config: RuntimeConfig | None = None):
        self.config = (config or RuntimeConfig()).validate()
        self._runner: BucketedRunner | None = None
        self._key: tuple | None = None
        self._values: tuple[float, ...] = ()
        self._plain: BucketedRunner | None = None

    @property
    def bucketed(self) -> bool:
        return self.config.engine == "buckets"

    def runner(self, backbone: nn.Module, exits: list[ExitRecord], num_classes: int) -> BucketedRunner:
        """The bucketed runner for these exits; rebuilt only when the exits (not just thresholds) changed."""
        key = (id(backbone), tuple((e.layer, id(e.head), id(e.gate), e.temperature) for e in exits))
        values = tuple(float(e.threshold or 0.0) for e in exits)
        if self._runner is None or key != self._key:
            self._runner, self._key, self._values = BucketedRunner(backbone, exits, num_classes, self.config), key, values
        elif values != self._values:
            self._runner.set_thresholds(list(values))
            self._values = values
        return self._runner

    def no_fire(self, backbone: nn.Module, exits: list[ExitRecord], num_classes: int) -> Callable:
        """``run(x) -> EarlyExitOutput`` with every threshold above reach: every exit runs, none fires (the
        worst case), on the same engine (and, bucketed, the same compiled steps) as the model itself."""
        if self.bucketed:
            return self.runner(backbone, exits, num_classes).with_thresholds([NEVER] * len(exits))
        never = [dataclasses.replace(e, threshold=NEVER) for e in exits]
        return EarlyExitRunner(backbone, never, num_classes)

    def plain(self, backbone: nn.Module, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``run(x) -> logits`` of the backbone run the way the early-exit model runs (bucketed: padded to the
        same buckets and compiled or captured the same way), the fair baseline for latency ratios."""
        if not self.bucketed:
            return backbone
        if self._plain is None:
            self._plain = BucketedRunner(backbone, [], num_classes, self.config)
        plain = self._plain

        def run(x: torch.Tensor) -> torch.Tensor:
            return plain(x).logits

        run.runner = plain  # type: ignore[attr-defined]  # warm() reaches it
        return run

    def warm(self, backbone: nn.Module, exits: list[ExitRecord], num_classes: int, example: torch.Tensor,
             plain: bool = False) -> list[int]:
        """Compile or capture every bucket now (the early-exit runner, and the plain one with ``plain``)."""
        if not self.bucketed:
            return []
        warmed = self.runner(backbone, exits, num_classes).warm(example)
        if plain:
            self.plain(backbone, num_classes)
            assert self._plain is not None
            self._plain.warm(example)
        return warmed

    @property
    def warm_buckets(self) -> list[int]:
        return [] if self._runner is None else list(self._runner.warm_buckets)

    def forget(self) -> None:
        """Drop the runners (after the model moved to another device)."""
        self._runner = self._plain = None
        self._key = None


def run_hooks_or_buckets(engine: Engine, hooks: Callable[[], EarlyExitRunner], backbone: nn.Module,
                         exits: Callable[[], list[ExitRecord]], num_classes: int, x: torch.Tensor, callback,
                         shrink: bool) -> EarlyExitOutput:
    """One early-exit call: the bucketed runner when the engine says so (shrinking only: the no-shrink pass,
    every exit on every sample, is the hook runtime's), else the hook runner ``hooks()`` builds."""
    if engine.bucketed and shrink:
        return engine.runner(backbone, exits(), num_classes)(x, callback=callback)
    return hooks()(x, callback=callback, shrink=shrink)
