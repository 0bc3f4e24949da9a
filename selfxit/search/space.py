"""The NNI model space of exit heads, built from a :class:`~selfxit.search.config.SearchConfig`.

The space is an NNI 3.0 :class:`~nni.nas.nn.pytorch.ModelSpace` (:class:`HeadSpace`): every choice of
the config is a labelled ``nni.choice`` registered with ``add_mutable`` (plus, optionally, a
:class:`FlopsBudget` constraint on the head's FLOPs), and NNI's ``freeze(choices)`` rebuilds the
concrete head (an ``nn.Sequential`` made by :func:`selfxit.core.heads.build_head` from the concrete
spec of those choices). Only the search imports this module: bundles store concrete specs.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch

from selfxit.extras import require_extra  # noqa: E402

require_extra("search", "head search")
os.environ.setdefault("NNI_FRAMEWORK", "none")  # before nni.nas: no pytorch-lightning import
with warnings.catch_warnings():  # NNI 3.0 warns about newer torch.nn classes it does not know
    warnings.simplefilter("ignore")
    import nni
    from nni.mutable import Constraint, ensure_frozen
    from nni.mutable.exception import ConstraintViolation
    from nni.nas.nn.pytorch import ModelSpace
    from nni.nas.space import model_context

from selfxit.core.flops import count_flops
from selfxit.core.heads import build_head
from selfxit.search.config import SpaceConfig, build_strategy  # noqa: F401 (build_strategy: NNI's side)

# ---- the NNI model space ---------------------------------------------------------------------------------------

class FlopsBudget(Constraint):
    """NNI constraint: the head a sample builds costs at most ``max_flops`` FLOPs (DeepSpeed count, batch 1).

    Strategies that sample (random, evolution) retry a violating sample and grid search skips it, so
    every trial they run trains a head within the budget.
    """

    def __init__(self, space: SpaceConfig, choices: dict, in_shape: tuple[int, ...], num_classes: int,
                 max_flops: float, label: str = "head_flops_budget"):
        self.label = label
        self.space, self.choices, self.in_shape, self.num_classes = space, choices, tuple(in_shape), num_classes
        self.max_flops = float(max_flops)
        self._flops: dict[str, int] = {}

    def leaf_mutables(self, is_leaf):
        for mutable in self.choices.values():
            yield from mutable.leaf_mutables(is_leaf)
        yield self

    def head_flops(self, sample: dict) -> int:
        """FLOPs of the head that ``sample`` builds (memoised per architecture)."""
        spec = self.space.spec(sample, self.in_shape)
        key = json.dumps(spec, sort_keys=True)
        if key not in self._flops:
            head = build_head(spec, self.in_shape, self.num_classes)
            self._flops[key] = count_flops(head, torch.zeros(1, *self.in_shape))
        return self._flops[key]

    def check_contains(self, sample: dict):
        for mutable in self.choices.values():
            exception = mutable.check_contains(sample)
            if exception is not None:
                return exception
        flops = self.head_flops(sample)
        if flops > self.max_flops:
            return ConstraintViolation(f"head FLOPs {flops} > budget {self.max_flops:.0f}")
        return None

    def extra_repr(self) -> str:
        return f"max_flops={self.max_flops:.0f}, label={self.label!r}"


class HeadSpace(ModelSpace):
    """NNI model space of the exit heads for one candidate layer.

    ``space`` is a :class:`SpaceConfig` as a plain dict (so NNI can record and replay the constructor),
    ``in_shape`` the per-sample activation shape, ``num_classes`` the backbone's class count, and
    ``max_flops`` (optional) a :class:`FlopsBudget` constraint on the heads.
    Attributes ``spec`` (the concrete head spec) and ``head`` (the ``nn.Sequential``) hold the current
    sample: NNI's defaults while the space is built, the frozen choices after :meth:`freeze`.
    """

    def __init__(self, space: dict, in_shape: list[int], num_classes: int, max_flops: float | None = None):
        super().__init__()
        config = SpaceConfig(**space)
        self._space_args = (copy.deepcopy(space), list(in_shape), int(num_classes), max_flops)
        choices = {label: self.add_mutable(nni.choice(label, values))
                   for label, values in config.labels(tuple(in_shape)).items()}
        if max_flops is not None:
            self.add_mutable(FlopsBudget(config, choices, tuple(in_shape), num_classes, max_flops))
        sample = {label: ensure_frozen(choice) for label, choice in choices.items()}
        self.spec = config.spec(sample, tuple(in_shape))
        self.head = build_head(self.spec, tuple(in_shape), num_classes)

    def freeze(self, sample: dict) -> "HeadSpace":
        """The space rebuilt with every choice fixed by ``sample`` ({label: value})."""
        with model_context(sample):
            return self.__class__(*self._space_args)

    def forward(self, x):
        return self.head(x)
