"""Per-sample forward FLOPs, measured with DeepSpeed's flops profiler.

What the counts include: FLOPs exactly as DeepSpeed's ``FlopsProfiler`` reports them. DeepSpeed
wraps ``torch.nn.functional`` (linear, conv, norms, activations, pooling, softmax,
scaled_dot_product_attention, ...) and a few tensor methods (``torch.matmul``/``mm``/``bmm``/``addmm``,
``torch.add``/``Tensor.add``, ``torch.mul``/``Tensor.mul``, ``einsum``), so:

* convolutions and linear layers count 2 x MACs (a multiply and an add per MAC); a linear layer's
  bias is not counted, a convolution's bias adds one FLOP per output element;
* norms, activations and pooling count a small constant per element;
* Python operators on tensors (``x + y``, ``x * y``, ``x += y``) are NOT counted, so residual
  additions and squeeze-excitation scalings are missing. They are a negligible share of a CNN's
  or transformer's cost, but the counts are a lower bound, not an exact operation count.

Counting runs with the model in eval mode but under ``torch.enable_grad()`` with every floating
parameter temporarily requiring grad: otherwise PyTorch's fused attention fast paths
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) bypass the wrapped functionals and
their FLOPs vanish. The model is returned exactly as found: training flags, ``requires_grad``,
hooks and attributes are restored, and no autograd graph outlives the profiled forward pass.
All counts are for a single sample: the profiled batch is ``example_input[:1]``.

DeepSpeed is the ``flops`` extra (``pip install 'selfxit[flops]'``, part of ``[all]``). Without it, or
where its profiler raises on a module (e.g. a conv whose stride is stored as a list, as in
efficientnet-lite-pytorch), counts come from ``torch.utils.flop_counter.FlopCounterMode`` with a warning:
that counter counts matmuls and convolutions (2 x MACs, no conv bias) and attention (run the same way,
grad on, and with a formula added for CPU flash attention, which torch's counter lacks), but not norms,
activations or pooling. Measured against DeepSpeed (tests/core/test_flops.py): totals 0.6% lower for
the CIFAR ResNets, 0.2-0.4% for torchvision's ResNets and ConvNeXt, 1.5% for RegNet, 2.6-2.8% for
MobileNetV3 and EfficientNet (activations and squeeze-excitation), 0.1% for ViT; the cumulative fractions
at candidate layers agree within about one point. ``counter="deepspeed"`` or ``"torch"`` forces one
(no fallback). A bundle records which counter it was measured with.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn

DEEPSPEED = "deepspeed.profiling.flops_profiler (residual python adds not counted)"
TORCH = "torch.utils.flop_counter.FlopCounterMode (matmul, conv and attention only)"
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def deepspeed_available() -> bool:
    """Whether DeepSpeed's profiler can be imported (the ``flops`` extra)."""
    try:
        _deepspeed_profiler()
    except ImportError:
        return False
    return True


def counter_name() -> str:
    """Which counter :func:`count_flops` uses in this environment (recorded in bundles)."""
    return DEEPSPEED if deepspeed_available() else TORCH


COUNTERS = ("deepspeed", "torch")  # what ``counter=`` takes; None: DeepSpeed, falling back to torch


def _with_fallback(deepspeed_count: Callable, torch_count: Callable, what: str, counter: str | None = None):
    """DeepSpeed's count, or torch's when DeepSpeed is missing or its profiler raises (with a warning).

    ``counter`` forces one of :data:`COUNTERS`, without fallback (errors propagate)."""
    if counter is not None:
        if counter not in COUNTERS:
            raise ValueError(f"counter must be one of {COUNTERS} or None; got {counter!r}")
        return deepspeed_count() if counter == "deepspeed" else torch_count()
    if not deepspeed_available():
        _warn_once("missing", "DeepSpeed is not installed (pip install 'selfxit[flops]'): FLOPs are counted with "
                              "torch's FlopCounterMode, which leaves out norms, activations and pooling")
        return torch_count()
    try:
        return deepspeed_count()
    except Exception as exc:  # any failure of the profiler's formulas; a broken forward fails again below
        _warn_once(f"failed:{what}", f"DeepSpeed's flops profiler failed on {what} ({type(exc).__name__}: {exc}); "
                                     "counting its FLOPs with torch's FlopCounterMode instead")
        return torch_count()


def _deepspeed_profiler():
    """DeepSpeed's profiler module, imported on first use (importing it is slow, and loading or serving a
    bundle never counts FLOPs)."""
    # Name the accelerator so DeepSpeed does not probe for one and print a warning on stdout at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.profiling.flops_profiler import profiler
    return profiler


def count_flops(module: nn.Module, example_input: torch.Tensor, counter: str | None = None) -> int:
    """FLOPs of one forward pass of module on example_input (batch 1, taken from example_input[:1]).

    ``counter``: "deepspeed" or "torch" to force one counter (no fallback); None, DeepSpeed with fallback."""
    def deepspeed_count() -> int:
        with _profiling(module) as prof:
            module(_one_sample(example_input))
            return int(prof.get_total_flops())

    def torch_count() -> int:
        with _torch_counting(module) as mode:
            module(_one_sample(example_input))
            return int(mode.get_total_flops())

    return _with_fallback(deepspeed_count, torch_count, type(module).__name__, counter)


def cumulative_flops(
    model: nn.Module, example_input: torch.Tensor, layer_names: list[str], counter: str | None = None
) -> tuple[int, dict[str, int]]:
    """(total FLOPs of the model, {layer_name: FLOPs spent up to and including that layer's forward output}).

    Forward hooks on the named submodules read the profiler's running total when they fire during one
    profiled forward pass of ``example_input[:1]``. The FLOPs remaining after a layer are
    ``total - cumulative[layer]``. A layer called several times is credited at its first call.
    ``counter`` as for :func:`count_flops`.

    Raises:
        ValueError: a name is not a submodule of ``model``, or a named layer never runs in forward.
    """
    modules = dict(model.named_modules())
    for name in layer_names:
        if name not in modules:
            raise unknown_module_error(name, modules)
    reached: dict[str, int] = {}

    def run(running_total: Callable[[], int]) -> None:
        def record(name: str) -> None:
            if name not in reached:
                reached[name] = running_total()

        # Registered after profiling starts, so they fire after the counter has folded the layer's FLOPs in.
        handles = [modules[name].register_forward_hook(lambda _m, _i, _o, name=name: record(name))
                   for name in dict.fromkeys(layer_names)]
        try:
            model(_one_sample(example_input))
        finally:
            for handle in handles:
                handle.remove()

    def deepspeed_count() -> int:
        reached.clear()
        with _profiling(model) as prof:
            run(lambda: _running_total(model))
            return int(prof.get_total_flops())

    def torch_count() -> int:
        reached.clear()
        with _torch_counting(model) as mode:
            run(mode.get_total_flops)
            return int(mode.get_total_flops())

    total = _with_fallback(deepspeed_count, torch_count, type(model).__name__, counter)
    missing = [name for name in layer_names if name not in reached]
    if missing:
        raise ValueError(f"layer(s) {missing} never ran during the forward pass, so no FLOPs can be placed after them")
    return total, {name: int(reached[name]) for name in layer_names}


def unknown_module_error(name: str, modules: dict[str, nn.Module]) -> ValueError:
    """A ValueError for a module name that is not in ``modules``, naming close matches or a few valid names."""
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(name, valid, n=5)
    hint = f"did you mean one of {close}?" if close else f"valid names include {valid[:8]}"
    return ValueError(f"unknown module name {name!r}: {hint}")


def _running_total(model: nn.Module) -> int:
    """FLOPs counted so far in the current profiled forward pass."""
    finished = sum(cast(int, m.__flops__) for m in model.modules())  # set by DeepSpeed on every module
    # Functionals called directly in a still-running forward (e.g. F.relu in the top-level forward)
    # sit in DeepSpeed's per-module stack until that module returns.
    pending = sum(flops for frame in _deepspeed_profiler().module_flop_count for _, flops in frame)
    return finished + pending


def _one_sample(example_input: torch.Tensor) -> torch.Tensor:
    """``example_input[:1]``, copied out of inference mode if it was made there (autograd must see it)."""
    x = example_input[:1]
    return x.clone() if x.is_inference() else x


@contextlib.contextmanager
def _profiling(model: nn.Module) -> Iterator:
    """Profile ``model`` in eval mode with grad on, restoring modes, ``requires_grad`` and hooks afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    _ds = _deepspeed_profiler()
    prof = _ds.FlopsProfiler(model)
    try:
        model.eval()
        for p, _ in grads:
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)
        prof.start_profile()
        # Also outside inference mode: autograd cannot record ops on inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            yield prof
    finally:
        prof.end_profile()
        # A forward that raised leaves its modules' frames on DeepSpeed's global stack; drop them so
        # they cannot leak into the next count.
        _ds.module_flop_count.clear()
        _ds.module_mac_count.clear()
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        for m, training in modes:
            m.training = training


def _torch_cpu_attention() -> dict:
    """FlopCounterMode's attention formula for the CPU flash-attention kernel, which it has none for (torch 2.x):
    without it, ``scaled_dot_product_attention`` on CPU counts nothing."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: formula}


@contextlib.contextmanager
def _torch_counting(model: nn.Module) -> Iterator:
    """Count with torch's FlopCounterMode in eval mode, with grad on as for DeepSpeed (so that fused attention
    fast paths, which that counter does not see either, are not taken), restoring modes and ``requires_grad``."""
    from torch.utils.flop_counter import FlopCounterMode
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad(), \
                FlopCounterMode(display=False, custom_mapping=_torch_cpu_attention()) as mode:
            yield mode
    finally:
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
        for m, training in modes:
            m.training = training
