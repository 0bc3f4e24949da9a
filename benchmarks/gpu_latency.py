"""GPU check of a bundle: latency ratios against the plain backbone (same run) and exactness of non-exited samples.

    python benchmarks/gpu_latency.py --bundle BUNDLE --model cifar_resnet56 [--data DIR] [--samples 2048]

Needs CUDA (exits with a message otherwise). Every timing is a median over repeated runs with
``torch.cuda.synchronize()``, early-exit and backbone alternated. The exactness check compares, for
each sample that no exit took, the early-exit logits with the backbone's logits on the same full
batch: on GPU, kernels picked for a shrunken batch may differ from the full batch's in the last bits,
so the max difference and the top-1 agreement are reported rather than assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.core.runtime import FINAL  # noqa: E402
from selfxit.evaluate.evaluation import cost_per_exit  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData  # noqa: E402


def _timed(fn, x, repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def latency_ratio(ee, inputs: torch.Tensor, batch: int, rounds: int = 15) -> dict:
    """Median early-exit / backbone time over batches of ``batch`` drawn from ``inputs``."""
    batches = [inputs[i:i + batch] for i in range(0, len(inputs) - batch + 1, batch)][:32]
    repeats = max(1, 64 // len(batches))
    ratios, plain_ms = [], []
    with torch.inference_mode():
        for x in batches[:2]:
            ee(x), ee.backbone(x)
        for r in range(rounds):
            plain = early = 0.0
            for x in batches:
                if r % 2:
                    early += _timed(ee, x, repeats)
                    plain += _timed(ee.backbone, x, repeats)
                else:
                    plain += _timed(ee.backbone, x, repeats)
                    early += _timed(ee, x, repeats)
            ratios.append(early / plain)
            plain_ms.append(1000 * plain / len(batches))
    return {"batch": batch, "ratio": statistics.median(ratios), "backbone_ms": statistics.median(plain_ms)}


def exactness(ee, inputs: torch.Tensor, batch: int = 128) -> dict:
    """Non-exited samples: early-exit logits vs the backbone's on the same batch."""
    worst, agree, count, exited = 0.0, 0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            x = inputs[i:i + batch]
            out, reference = ee(x), ee.backbone(x)
            final = out.exit == FINAL
            exited += int((~final).sum())
            if final.any():
                diff = (out.logits[final] - reference[final]).abs().max().item()
                worst = max(worst, diff)
                agree += int((out.logits[final].argmax(1) == reference[final].argmax(1)).sum())
                count += int(final.sum())
    return {"non_exited": count, "exited": exited, "max_abs_logit_diff": worst,
            "top1_agreement_non_exited": agree / count if count else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--weights")
    p.add_argument("--data", help="image folder (default: the shared CIFAR-10 test images)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batches", default="1,8,32,128,512")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU latency")
    model, info = load_backbone(args.model, args.weights)
    ee = selfxit.load(args.bundle, model)
    device = torch.device("cuda")
    ee.backbone.to(device)
    for head in ee.heads.values():
        head.to(device)
    ee.thresholds = ee.thresholds  # rebuild the runner on the moved heads
    data = ImageFolderData(args.data or shared_dir() / "data" / "cifar10-test", info, max_samples=args.samples)
    inputs = torch.stack([data[i][0] for i in range(len(data))]).to(device)
    with torch.inference_mode():
        exits = torch.cat([ee(inputs[i:i + 256]).exit for i in range(0, len(inputs), 256)]).cpu()
    costs = torch.as_tensor(cost_per_exit(ee))
    position = torch.where(exits == FINAL, len(costs) - 1, exits)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "samples": len(inputs),
              "exits": list(ee.thresholds), "flops_fraction": float(costs[position].mean() / ee.backbone_flops),
              "exactness": exactness(ee, inputs),
              "latency": [latency_ratio(ee, inputs, int(b)) for b in args.batches.split(",")]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
