"""The report's measurements that run the models again: size on disk and in memory, peak live tensor memory,
and latency (CPU, and GPU when there is one) of the early-exit model against its backbone.

Latency is timed by :mod:`selfxit.core.latency`, the same timer :func:`selfxit.evaluate.evaluation.evaluate` uses.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from selfxit.core.latency import alternate
from selfxit.core.runtime import EarlyExitRunner

PEAK_MEMORY_METHOD = (
    "Live tensor bytes during one forward pass, tracked op by op with a torch dispatch mode: every storage an "
    "operator allocates is added when it appears and subtracted when the last tensor using it is garbage "
    "collected (weak-reference finalizers); views and in-place results of existing storages are not counted "
    "again. The input batch, the weights and the heads exist before the pass and are not counted; the output is. "
    "Scratch buffers allocated inside a kernel (e.g. oneDNN workspaces) are invisible to this method.")
LATENCY_METHOD = (
    "Wall time on CPU in inference mode, with the backbone and the early-exit model run on the same batches and "
    "alternated (backbone first on even batches, early exit first on odd ones) after one warm-up call each. "
    "Per-sample latency is the time from the start of a batch until that sample's answer is known: the batch "
    "time for the backbone; for the early-exit model the moment its exit fires (the per-sample callback), so "
    "samples that leave early are answered early. Time per sample (throughput) is batch time / batch size.")


def batch_of(pool: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """``size`` samples of ``pool`` from ``start`` on, wrapping around (so any batch size can be timed)."""
    return pool[torch.arange(start, start + size) % len(pool)]


# ---- 3. cost ------------------------------------------------------------------------------------------

def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _serialized_bytes(state_dict: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getbuffer().nbytes


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages allocated by operators while active, and their peak."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors holding it]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self._live[ptr]
                self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._live.get(ptr)
            if entry is None:
                if ptr in inputs:  # a view or in-place result of a storage that existed before
                    continue
                entry = self._live[ptr] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_live_bytes(fn, x: torch.Tensor) -> int:
    """Peak of live tensor bytes allocated while ``fn(x)`` runs (see :data:`PEAK_MEMORY_METHOD`)."""
    tracker = LiveTensorBytes()
    with torch.inference_mode(), tracker:
        out = fn(x)
    del out
    return tracker.peak


def cost_report(ee, summary: dict, pool: torch.Tensor, batch_sizes, bundle_dir=None, weights_path=None,
                progress: bool = True) -> dict:
    """FLOPs per sample, model size on disk and in memory, and peak live tensor memory per batch size."""
    active = list(ee.thresholds)
    disk = {"backbone_state_dict": _serialized_bytes(ee.backbone.state_dict()),
            "weights_file": Path(weights_path).stat().st_size if weights_path else None,
            "bundle_files": None, "bundle_total": None}
    if bundle_dir is not None:
        files = {p.name: p.stat().st_size for p in sorted(Path(bundle_dir).iterdir()) if p.is_file()}
        disk["bundle_files"], disk["bundle_total"] = files, sum(files.values())
    gates = ee.gates if ee.gate == "learned" else {}
    memory = {"backbone": _tensor_bytes(ee.backbone),
              "heads_all": sum(_tensor_bytes(h) for h in ee.heads.values()),
              "heads_active": sum(_tensor_bytes(ee.heads[name]) for name in active)}
    memory["early_exit_total"] = memory["backbone"] + memory["heads_active"]
    ee(pool[:1])  # builds the runtime (temperature-folded head copies) before anything is measured
    peaks = []
    for b in tqdm(batch_sizes, desc="report: peak memory", disable=not progress):
        x = batch_of(pool, 0, b)
        peaks.append({"batch_size": b, "backbone": peak_live_bytes(ee.backbone, x),
                      "early_exit": peak_live_bytes(ee, x)})
    return {
        "flops": {"backbone_per_sample": ee.backbone_flops,
                  "early_exit_per_sample": summary["flops_fraction"] * ee.backbone_flops,
                  "fraction": summary["flops_fraction"],
                  "head_flops": {name: ee.head_flops[name] for name in ee.heads},
                  "active_head_flops": sum(ee.head_flops[name] for name in active),
                  "gate_flops": {name: gates[name].flops() for name in gates},
                  "active_gate_flops": sum(gates[name].flops() for name in active if name in gates)},
        "disk_bytes": disk, "memory_bytes": memory,
        "peak_live_bytes": {"method": PEAK_MEMORY_METHOD, "batches": peaks},
    }


# ---- 4. latency ---------------------------------------------------------------------------------------

def _stats(batch_seconds: list[float], sample_seconds: list[np.ndarray], batch: int) -> dict:
    ms = 1000 * np.concatenate(sample_seconds)
    return {"latency_mean_ms": float(ms.mean()), "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99)),
            "ms_per_sample": float(1000 * sum(batch_seconds) / (batch * len(batch_seconds)))}


def measure_latency(backbone_run, early_run, pool: torch.Tensor, batch_sizes, samples: int, device: str = "cpu",
                    progress: bool = True) -> list[dict]:
    """Backbone vs early exit per batch size, alternating the two on the same batches (see :data:`LATENCY_METHOD`).

    Each ``run(x, callback)``; ``early_run`` None times the backbone alone. At least one batch per size,
    and about ``samples`` samples.
    """
    runs = {"backbone": backbone_run, **({"early_exit": early_run} if early_run is not None else {})}
    per_sample = ("early_exit",) if device == "cpu" else ()  # a callback per sample forces a GPU sync each time
    counts = {b: max(1, math.ceil(samples / b)) for b in batch_sizes}
    bar = tqdm(total=sum(b * n for b, n in counts.items()), desc=f"report: latency {device}", unit="img",
               disable=not progress)
    results = []
    for b, count in counts.items():
        bar.set_postfix(batch=b)
        batches = [batch_of(pool, i * b, b) for i in range(count)]
        times = alternate(runs, batches, device, per_sample, on_batch=lambda x: bar.update(len(x)))
        row = {"batch_size": b, "batches": count,
               **{name: _stats(t.batch_seconds, t.sample_seconds, b) for name, t in times.items()}}
        if "early_exit" in row:
            row["ratio_mean_latency"] = row["early_exit"]["latency_mean_ms"] / row["backbone"]["latency_mean_ms"]
            row["ratio_ms_per_sample"] = row["early_exit"]["ms_per_sample"] / row["backbone"]["ms_per_sample"]
        results.append(row)
    bar.close()
    return results


def _cuda_latency(ee, pool: torch.Tensor, batch_sizes, samples: int, progress: bool) -> dict:
    """GPU latency on copies of the backbone and heads; the backbone alone if the early-exit runtime fails there."""
    backbone = copy.deepcopy(ee.backbone).cuda().eval()
    exits = [dataclasses.replace(e, head=copy.deepcopy(e.head).cuda().eval(),
                                 gate=copy.deepcopy(e.gate).cuda().eval() if e.gate is not None else None)
             for e in ee.exits]
    runner = EarlyExitRunner(backbone, exits, ee.num_classes)
    result = {"device": torch.cuda.get_device_name(), "error": None}
    early = lambda x, cb: runner(x)  # noqa: E731
    try:
        with torch.inference_mode():
            runner(batch_of(pool, 0, 2).cuda())
    except Exception as exc:  # noqa: BLE001 - report why, and still time the backbone
        result["error"], early = f"early exit on GPU failed: {type(exc).__name__}: {exc}", None
    result["batches"] = measure_latency(lambda x, cb: backbone(x), early, pool, batch_sizes, samples, "cuda",
                                        progress)
    return result


def latency_report(ee, pool: torch.Tensor, batch_sizes, samples: int, progress: bool = True) -> dict:
    """CPU latency (and GPU when CUDA is available) of the early-exit model against its backbone."""
    return {"method": LATENCY_METHOD, "threads": torch.get_num_threads(),
            "cpu": measure_latency(lambda x, cb: ee.backbone(x), lambda x, cb: ee(x, callback=cb), pool,
                                   batch_sizes, samples, "cpu", progress),
            "cuda": _cuda_latency(ee, pool, batch_sizes, samples, progress) if torch.cuda.is_available() else None}
