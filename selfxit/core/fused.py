"""One exit's work as one callable (stage, head, exit decision), run eagerly, compiled or as a CUDA graph.

Why fuse: on a CPU at batch 1 each exit's cost is mostly per-op overhead (a handful of small ops for the
head, softmax and the threshold test), and on a GPU it is kernel launches. ``torch.compile`` turns the head
and its decision into one generated kernel; a CUDA graph replays a whole stage with its head in one launch.

How it is compiled (``COMPILE_MODES``):

- ``off``: eager;
- ``heads``: ``torch.compile`` of the head and its decision, the backbone's stages eager (on CPU this keeps
  the backbone's own kernels, so the latency ratio measures the exits' cost alone);
- ``all``: ``torch.compile`` of stage, head and decision together;
- ``reduce-overhead``: ``all`` in torch.compile's CUDA-graph mode;
- ``cudagraph``: each step captured eagerly in a ``torch.cuda.CUDAGraph`` per bucket.

Every step is compiled for fixed shapes, one per bucket, on the first call at that bucket (warm-up pays it
before serving; inductor's on-disk cache, on by default, makes later processes faster). A compile that fails
falls back to eager for that step, with a warning; CUDA graphs without a CUDA device fall back the same way.
A CUDA out-of-memory error while warming names the bucket and step.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

COMPILE_MODES = ("off", "heads", "all", "reduce-overhead", "cudagraph")


class Decide(nn.Module):
    """Head and exit decision: (activation, threshold, valid rows) -> (logits / T, probabilities, hit, keep, count):
    ``hit`` the real rows that exit here, ``keep`` the real rows that go on, ``count`` how many go on (the one
    number the host may read).

    The threshold is an input (a 0-d tensor), not a constant: moving it (a live guard, a no-fire timing run)
    needs no recompile or recapture, and runners with other thresholds share the compiled step.
    """

    def __init__(self, head: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.head, self.gate = head, gate

    def scores(self, y: torch.Tensor, previous: torch.Tensor | None = None):
        """(logits / T, probabilities, score): what the exit rule is applied to."""
        logits = self.head(y)
        probs = logits.softmax(dim=1)
        return logits, probs, probs.amax(dim=1) if self.gate is None else self.gate(logits, previous)

    def forward(self, y: torch.Tensor, threshold: torch.Tensor, valid: torch.Tensor,
                previous: torch.Tensor | None = None):
        logits, probs, score = self.scores(y, previous)
        fires = score >= threshold
        hit, keep = fires & valid, valid & ~fires
        return logits, probs, hit, keep, keep.sum()


class Step(nn.Module):
    """Stage then decision: (previous exit's tensor, threshold, valid) -> (this exit's tensor, *the decision's
    outputs); the last stage: tensor -> (the backbone's logits,)."""

    def __init__(self, stage: nn.Module, decide: Callable | None):
        super().__init__()
        self.stage, self.decide = stage, decide

    def forward(self, x: torch.Tensor, threshold: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                previous: torch.Tensor | None = None):
        y = self.stage(x)
        if self.decide is None:
            return (y,)
        return (y, *self.decide(y, threshold, valid, previous))


class _Compiled:
    """``torch.compile`` of a module with eager fallback: a failure on the first call of a shape warns once and
    runs that module eagerly from then on (later failures are real errors and propagate)."""

    def __init__(self, module: nn.Module, mode: str | None, name: str):
        self.module, self.name = module, name
        self.seen: set[tuple] = set()
        self.fn: Callable | None = torch.compile(module, mode=mode, dynamic=False)
        self.graphs = mode == "reduce-overhead"  # CUDA graph trees: outputs live in memory the next replay reuses

    def __call__(self, *args):
        if self.fn is None:
            return self.module(*args)
        key = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if key in self.seen:
            return self._run(*args)
        import torch._dynamo.config as dynamo_config
        try:  # one compile per bucket: more than dynamo's default limit per code object
            with dynamo_config.patch(recompile_limit=1024, accumulated_recompile_limit=1 << 16):
                out = self._run(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raised, eager still works
            warnings.warn(f"torch.compile of {self.name} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            self.fn = None
            return self.module(*args)
        self.seen.add(key)
        return out

    def _run(self, *args):
        assert self.fn is not None
        if not self.graphs:
            return self.fn(*args)
        torch.compiler.cudagraph_mark_step_begin()  # the outputs below are copied out, so earlier ones may go
        return tuple(t.clone() for t in self.fn(*args))


class _Captured:
    """A module replayed as one CUDA graph per input shape (captured on the first call of that shape)."""

    def __init__(self, module: nn.Module, name: str, pool):
        self.module, self.name, self.pool = module, name, pool
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        key = tuple(tuple(a.shape) for a in tensors)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, outputs = self.graphs[key]
        for static, live in zip(inputs, tensors):
            static.copy_(live)
        graph.replay()
        return tuple(t.clone() for t in outputs)  # the next replay overwrites the static outputs

    def _capture(self, args):
        statics = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (cuDNN picks its kernels here)
                self.module(*statics)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.module(*statics)
        return graph, [s for s in statics if isinstance(s, torch.Tensor)], outputs


def runnable(module: nn.Module, mode: str, name: str, device: torch.device, pool=None) -> Callable:
    """``module`` as the callable ``mode`` asks for (see the module docstring); eager where that cannot be had."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}; got {mode!r}")
    if mode == "off":
        return module
    if mode == "cudagraph":
        if device.type != "cuda":
            warnings.warn(f"compile='cudagraph' needs a CUDA device; {name} runs eagerly on {device}",
                          RuntimeWarning, stacklevel=2)
            return module
        return _Captured(module, name, pool)
    return _Compiled(module, "reduce-overhead" if mode == "reduce-overhead" else None, name)


def build_step(stage: nn.Module, decide: nn.Module | None, mode: str, name: str, device: torch.device,
               pool=None) -> Callable:
    """One exit's step under ``mode``: with ``heads`` only the decision is compiled, else the whole step."""
    if mode == "heads":
        return Step(stage, None if decide is None else runnable(decide, "all", f"{name} head", device))
    return runnable(Step(stage, decide), mode, name, device, pool)


def warm_error(exc: BaseException, bucket: int, name: str) -> RuntimeError:
    """The error for a CUDA out-of-memory while warming: which bucket of which step did not fit."""
    return RuntimeError(f"CUDA out of memory while warming bucket {bucket} of {name}: {str(exc).splitlines()[0]} "
                        f"(lower the maximum batch, e.g. --max-microbatch, or drop the largest buckets)")
