"""CPU latency of the runtimes on a bundle: the hook runtime and the bucketed one, eager and compiled.

    .venv/bin/python benchmarks/cpu_runtime.py --bundle BUNDLE [--model cifar_resnet56] [--data DIR]
        [--samples 300] [--modes off,heads,all] [--b32-modes off] [--json out.json]

For each runtime it times, in one alternated run (:func:`selfxit.core.latency.alternate`) on the same
held-back test images at batch 1: the early-exit model, the same model with every threshold above reach
(no exit fires: the worst case), the eager backbone, and for the bucketed runtime the backbone run the
same way (cut the same way, padded to the same buckets, compiled the same way: the fair baseline of a
compiled model). Ratios are early-exit time / backbone time (``_ratios`` says which three estimates); the
spread is over blocks of 50 batches.
flops_fraction is measured on the whole test split. Compile seconds are the warm-up of every step at every
bucket (torch.compile costs 7-30 s per step and shape on a 2-core machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import trim_mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.core.bucketed import RuntimeConfig  # noqa: E402
from selfxit.core.engine import NEVER, Engine  # noqa: E402
from selfxit.core.latency import alternate  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, split_indices  # noqa: E402


def _ratios(timings, name: str, base: str, block: int = 50) -> dict:
    """``ratio``: total time over total time (what evaluate reports). On a loaded machine a preempted call
    dominates a sum, so also ``paired``: the 10%-trimmed mean of per-batch ratios (the two runs of a batch are
    timed back to back), and ``median``: median over median (for runs whose cost does not depend on the input,
    e.g. the no-fire pass against the backbone)."""
    a, b = np.array(timings[name].batch_seconds), np.array(timings[base].batch_seconds)
    blocks = [a[i:i + block].sum() / b[i:i + block].sum() for i in range(0, len(a) - block + 1, block)] or \
        [a.sum() / b.sum()]
    return {"ratio": float(a.sum() / b.sum()), "paired": float(trim_mean(a / b, 0.1)),
            "median": float(np.median(a) / np.median(b)), "block_min": float(min(blocks)),
            "block_max": float(max(blocks))}


def time_runtimes(ee, inputs: torch.Tensor, batch: int, modes: list[str], samples: int) -> dict:
    """One alternated run of every runtime in ``modes`` (plus the hook runtime and the eager backbone)."""
    batches = [inputs[i:i + batch] for i in range(0, len(inputs) - batch + 1, batch)][:max(1, samples // batch)]
    runs = {"backbone": lambda x, _cb: ee.backbone(x)}
    hooks = Engine()
    hooks_runner, hooks_never = ee._hook_runner(), hooks.no_fire(ee.backbone, ee.exits, ee.num_classes)
    runs["hooks"] = lambda x, _cb: hooks_runner(x)
    runs["hooks_nofire"] = lambda x, _cb: hooks_never(x)
    compile_s = {}
    for mode in modes:
        engine = Engine(RuntimeConfig(engine="buckets", compile=mode, max_batch=batch))
        start = time.perf_counter()
        engine.warm(ee.backbone, ee.exits, ee.num_classes, inputs[:1], plain=True)
        compile_s[mode] = time.perf_counter() - start
        runner = engine.runner(ee.backbone, ee.exits, ee.num_classes)
        never, plain = engine.no_fire(ee.backbone, ee.exits, ee.num_classes), engine.plain(ee.backbone, ee.num_classes)
        runs[f"buckets_{mode}"] = lambda x, _cb, r=runner: r(x)
        runs[f"buckets_{mode}_nofire"] = lambda x, _cb, r=never: r(x)
        runs[f"buckets_{mode}_plain"] = lambda x, _cb, r=plain: r(x)
    timings = alternate(runs, batches)
    out = {"batch": batch, "batches": len(batches), "backbone_ms": 1000 * timings["backbone"].total / len(batches),
           "compile_seconds": compile_s, "vs_eager_backbone": {}, "vs_same_runtime_backbone": {}}
    for name in runs:
        if name != "backbone":
            out["vs_eager_backbone"][name] = _ratios(timings, name, "backbone")
    for mode in modes:
        for suffix in ("", "_nofire"):
            out["vs_same_runtime_backbone"][f"buckets_{mode}{suffix}"] = _ratios(
                timings, f"buckets_{mode}{suffix}", f"buckets_{mode}_plain")
    return out


def head_cost(ee, inputs: torch.Tensor, spec: dict, samples: int) -> dict:
    """The no-fire pass at batch 1 with the bundle's heads and with untrained heads of ``spec`` at the same
    layers (timing only: what the heads' size costs when no exit fires), and the bundle's heads run after the
    backbone on its captured activations (no runtime at all), in one alternated run."""
    from selfxit.core.heads import build_head
    from selfxit.core.hooks import capture
    from selfxit.core.runtime import EarlyExitRunner, _with_temperature
    torch.manual_seed(0)
    small = [dataclasses.replace(e, head=build_head(spec, e.shape, ee.num_classes).eval(), temperature=1.0,
                                 threshold=NEVER) for e in ee.exits]
    bundle_heads = Engine().no_fire(ee.backbone, ee.exits, ee.num_classes)
    spec_heads = EarlyExitRunner(ee.backbone, small, ee.num_classes)
    scaled = [(e.layer, _with_temperature(e.head, e.temperature)) for e in ee.exits]

    def heads_after(x, _cb):
        with capture(ee.backbone, [layer for layer, _ in scaled]) as outputs:
            ee.backbone(x)
        for layer, head in scaled:
            float(head(outputs[layer]).softmax(dim=1).max())

    runs = {"backbone": lambda x, _cb: ee.backbone(x), "nofire_bundle_heads": lambda x, _cb: bundle_heads(x),
            "nofire_spec_heads": lambda x, _cb: spec_heads(x), "bundle_heads_after_backbone": heads_after}
    timings = alternate(runs, [inputs[i:i + 1] for i in range(min(samples, len(inputs)))])
    params = {name: sum(p.numel() for e in exits for p in e.head.parameters())
              for name, exits in (("bundle", ee.exits), ("spec", small))}
    return {"spec": spec, "head_params": params, **{k: _ratios(timings, k, "backbone") for k in list(runs)[1:]}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--weights")
    p.add_argument("--data", help="image folder (default: the shared CIFAR-10 test images)")
    p.add_argument("--samples", type=int, default=300, help="images timed at batch 1")
    p.add_argument("--modes", default="off,heads,all", help="bucketed runtimes timed at batch 1 (compile modes)")
    p.add_argument("--b32-modes", default="off", help="bucketed runtimes timed at batch 32 ('' for none)")
    p.add_argument("--compare-head", type=json.loads,
                   help='a head spec, e.g. \'{"kind": "pool_mlp", "pool": 2, "hidden": [64]}\': also time the no-fire '
                        "pass with untrained heads of that spec at the same layers")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, info = load_backbone(args.model, args.weights)
    ee = selfxit.load(args.bundle, model)
    made = ee.provenance
    data = ImageFolderData(args.data or shared_dir() / "data" / "cifar10-test", info, max_samples=made.max_samples,
                           seed=made.seed or 0)
    test = torch.utils.data.Subset(data, split_indices(len(data), made.seed or 0)["test"].tolist())
    result = evaluate(ee, torch.utils.data.DataLoader(test, batch_size=64), latency=False, progress=False)
    inputs = torch.stack([test[i][0] for i in range(min(len(test), max(args.samples, 32 * 10)))])
    out = {"bundle": str(args.bundle), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "test_samples": result.num_samples, "flops_fraction": result.flops_fraction, "agreement": result.agreement,
           "exit_rates": result.exit_rates,
           "b1": time_runtimes(ee, inputs, 1, [m for m in args.modes.split(",") if m], args.samples)}
    out["b32"] = time_runtimes(ee, inputs, 32, [m for m in args.b32_modes.split(",") if m], 32 * 10)
    if args.compare_head:
        out["head_cost"] = head_cost(ee, inputs, args.compare_head, args.samples)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
