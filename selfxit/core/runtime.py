"""Early-exit inference with batch shrinking, driven by forward hooks on the frozen backbone.

Each active exit is a forward hook on its backbone layer. The hook runs the exit's head on the
layer's output; samples whose calibrated confidence reaches the threshold are answered there and
removed from the batch (the hook returns the smaller tensor, so the rest of the backbone only sees
the samples still running); when none are left the backbone stops. Because an exit layer is a
point where the rest of the network depends on that tensor alone, the samples that go on get
exactly the computation the plain backbone would give them. A forward that reads the batch size before
an exit and uses it after (``bs = x.size(0)`` ... ``x.view(bs, -1)``) runs as a traced graph that reads it
from the running rows instead (:func:`selfxit.core.graph.batch_safe_module`).

One subtlety keeps that exact: CPU kernels take other code paths for small batches (oneDNN convolutions
for a batch of one, GEMV instead of GEMM, small-M GEMM blockings up to a machine-dependent size), which
change the last bits. So survivors never run in a smaller batch than the backbone's answer was defined at:
the runtime measures once, per input shape, the smallest batch size from which the backbone's rows stop
depending on the batch size (:func:`selfxit.core.exactness.invariant_rows`), and pads fewer survivors up to
``min(that size, the input batch)`` with copies of the first one, whose results are dropped.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Callable, cast

import torch
from torch import nn

from selfxit.core.cascade import ChainedHead, is_chained
from selfxit.core.exactness import invariant_rows
from selfxit.core.exits import ExitRecord
from selfxit.core.graph import batch_safe_module

FINAL = -1  # exit index of samples answered by the backbone itself

# backbone -> {(row shape, dtype, device): smallest batch-invariant size}; a property of the backbone alone, so
# every runner built on it (after each fit, reload or guard move) shares one measurement
_INVARIANT: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


Exit = ExitRecord  # the runtime's name for an active exit record


@dataclass
class SampleResult:
    """One sample's answer, as handed to the callback the moment it is known."""

    index: int  # position in the input batch
    prediction: int
    confidence: float
    exit: int  # position of the exit in the cascade, or FINAL
    probabilities: torch.Tensor


@dataclass
class EarlyExitOutput:
    """Per-sample answers for a batch, in input order."""

    predictions: torch.Tensor  # [B] long
    probabilities: torch.Tensor  # [B, classes]: calibrated head softmax, or the backbone's softmax
    logits: torch.Tensor  # [B, classes]: head logits / T, or the backbone's own logits (bit-exact)
    confidence: torch.Tensor  # [B]
    exit: torch.Tensor  # [B] long: exit position, or FINAL (-1)
    exit_predictions: torch.Tensor | None = None  # [exits, B] every exit's top-1 (no-shrink mode only)
    exit_confidence: torch.Tensor | None = None  # [exits, B] (no-shrink mode only)
    prediction_sets: torch.Tensor | None = None  # [B, classes] bool conformal sets (when asked for)


def _with_temperature(head: nn.Module, temperature: float) -> nn.Module:
    """A copy of ``head`` whose logits come out divided by ``temperature`` (saves an op per exit)."""
    last = head[-1] if isinstance(head, nn.Sequential) and len(head) else None
    if not isinstance(last, nn.Linear):
        return nn.Sequential(head, _Scale(1.0 / temperature)).eval()
    scaled = copy.deepcopy(head).eval()
    scaled_last = cast(nn.Linear, cast(nn.Sequential, scaled)[-1])  # checked on ``last`` above
    with torch.no_grad():
        scaled_last.weight.div_(temperature)
        if scaled_last.bias is not None:
            scaled_last.bias.div_(temperature)
    return scaled


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _AllExited(Exception):
    """Raised inside a hook to stop the backbone once every sample has its answer."""


class _Pass:
    """Book-keeping of one forward pass: which input rows are still running."""

    def __init__(self, batch: int, classes: int, exits: int, shrink: bool, callback, device, min_rows: int):
        self.alive = torch.arange(batch, device=device)
        self.min_rows = min(batch, min_rows)  # survivors run in batches of at least this many rows
        self.real: int | None = None  # rows of the running tensor that are real samples (None: all of them)
        self.shrink, self.callback = shrink, callback
        self.logits = torch.empty(batch, classes, device=device)
        self.probabilities = torch.empty(batch, classes, device=device)
        self.exit = torch.full((batch,), FINAL, dtype=torch.long, device=device)
        self.all_predictions = torch.empty(exits, batch, dtype=torch.long, device=device) if not shrink else None
        self.all_confidence = torch.empty(exits, batch, device=device) if not shrink else None
        self.previous: torch.Tensor | None = None  # previous exit's probabilities for the running rows (gates)
        self.chain: torch.Tensor | None = None  # chained heads' own log-softmaxes [k, running rows, C] (cascade)

    def answer(self, rows: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, exit_position: int):
        self.logits[rows], self.probabilities[rows], self.exit[rows] = logits, probs, exit_position
        if self.callback is not None:
            confidence, prediction = probs.max(dim=1)
            for i, row in enumerate(rows.tolist()):
                self.callback(SampleResult(row, int(prediction[i]), float(confidence[i]), exit_position, probs[i]))


class EarlyExitRunner:
    """Runs a frozen backbone with a cascade of exits (in forward order)."""

    def __init__(self, backbone: nn.Module, exits: list[ExitRecord], num_classes: int):
        self.backbone = backbone
        self.num_classes = num_classes
        self.exits = list(exits)
        modules = dict(backbone.named_modules())
        missing = [e.layer for e in self.exits if e.layer not in modules]
        if missing:
            raise ValueError(f"exit layers {missing} are not modules of the backbone")
        self._modules = [modules[e.layer] for e in self.exits]
        # the backbone itself, or its traced graph where it reads the batch size before an exit and uses it after
        self._forward = batch_safe_module(backbone, [e.layer for e in self.exits])
        self._scaled_heads = [cast(ChainedHead, e.head).scaled(e.temperature) if is_chained(e.head) else
                              _with_temperature(e.head, e.temperature) for e in self.exits]
        self._chained = [is_chained(e.head) for e in self.exits]  # heads that read the chain (core/cascade.py)
        # only gates that read the previous exit need its probabilities carried for the surviving rows
        self._carry_previous = any(getattr(e.gate, "previous", False) for e in self.exits)
        self._pass: _Pass | None = None

    def _min_rows(self, x: torch.Tensor) -> int:
        """Smallest batch survivors may run in so their rows equal the backbone's (measured once per backbone and
        input shape, shared by every runner on that backbone)."""
        if len(x) <= 1:
            return 1
        known = _INVARIANT.setdefault(self.backbone, {})
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in known:
            known[key] = invariant_rows(self._forward, x[:1])
        return known[key]

    def _hook(self, position: int):
        head, threshold = self._scaled_heads[position], self.exits[position].threshold
        gate = self.exits[position].gate

        def hook(module, inputs, output):
            state = self._pass
            running = output if state.real is None else output[:state.real]
            if self._chained[position]:  # reads and extends the chain of the rows still running
                logits, state.chain = head(running, state.chain)
            else:
                logits = head(running)  # already divided by the temperature
            probs = logits.softmax(dim=1)
            previous, state.previous = state.previous, probs  # gates read the previous exit's output
            score = None if gate is None else gate(logits, previous)
            if state.shrink and float(probs.max() if gate is None else score.max()) < threshold:
                return None  # the common case costs one reduction
            confidence, prediction = probs.max(dim=1)
            score = confidence if gate is None else score
            if not state.shrink:
                state.all_predictions[position], state.all_confidence[position] = prediction, confidence
                first = (score >= threshold) & (state.exit == FINAL)
                if first.any():
                    state.answer(state.alive[first], logits[first], probs[first], position)
                return None
            hit = score >= threshold
            state.answer(state.alive[hit], logits[hit], probs[hit], position)
            keep = ~hit
            state.alive = state.alive[keep]
            if self._carry_previous:
                state.previous = probs[keep]
            if state.chain is not None:
                state.chain = state.chain[:, keep]
            if len(state.alive) == 0:
                raise _AllExited
            survivors = running[keep]
            if len(survivors) >= state.min_rows:
                state.real = None
                return survivors
            state.real = len(survivors)  # padded with copies of the first survivor, dropped at the end
            pad = survivors[:1].expand(state.min_rows - len(survivors), *survivors.shape[1:])
            return torch.cat([survivors, pad])

        return hook

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, callback: Callable[[SampleResult], None] | None = None,
                 shrink: bool = True) -> EarlyExitOutput:
        """Answer every sample of ``x``; ``callback`` gets each sample's result as soon as it is known.

        ``shrink=False`` runs every sample through every exit and the whole backbone, recording every
        exit's prediction (answers are the same as with shrinking; only slower).
        """
        if self._pass is not None:
            raise RuntimeError("EarlyExitRunner is not re-entrant; use one runner per thread")
        batch = len(x)
        min_rows = self._min_rows(x) if shrink else batch  # probed before the exits' hooks are in place
        hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._modules)]
        try:
            self._pass = _Pass(batch, self.num_classes, len(self.exits), shrink, callback, x.device, min_rows)
            try:
                final_logits = self._forward(x)
            except _AllExited:
                final_logits = None
            state = self._pass
            if final_logits is not None:
                if state.real is not None:
                    final_logits = final_logits[:state.real]
                rows = state.alive if shrink else torch.nonzero(state.exit == FINAL).flatten()
                final_logits = final_logits if shrink else final_logits[rows]
                state.answer(rows, final_logits, final_logits.softmax(dim=1), FINAL)
        finally:
            for h in hooks:
                h.remove()
            self._pass = None
        confidence, predictions = state.probabilities.max(dim=1)
        return EarlyExitOutput(predictions, state.probabilities, state.logits, confidence, state.exit,
                               state.all_predictions, state.all_confidence)
