"""Drift: a stale bundle on shifted traffic, and one nightly retrain on the logged shifted traffic.

On the shared ResNet-56 and CIFAR-10 images, split into three disjoint sets (seeded):

* A (clean) builds the serving bundle with ``selfxit enable``;
* B is "today's" traffic under a shift (blur, noise or brightness), appended to a traffic log with
  ``selfxit collect --transform``;
* C is held out: the bundles are measured on C clean and on C under the same shift.

It prints, for the stale bundle before/after the shift and for the retrained one after it, the live
agreement with the backbone and per-exit hit rates as the serving monitor measures them (shadow
fraction 1), and the FLOPs fraction — all from one run, with the command lines it ran.

    .venv/bin/python benchmarks/drift.py --shift blur --tolerance 0.05
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.cli import main  # noqa: E402
from selfxit.cli.common import quiet_libraries  # noqa: E402
from selfxit.evaluate.evaluation import evaluate  # noqa: E402
from selfxit.ops.retrain import RetrainConfig, retrain, summary  # noqa: E402
from selfxit.ops.shift import apply_shift  # noqa: E402
from selfxit.ops.versions import BundleStore  # noqa: E402
from selfxit.serve.monitor import MonitorConfig, TrafficMonitor  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import IMAGE_EXTENSIONS, ImageFolderData  # noqa: E402


def _link_subset(files: list[Path], root: Path, out: Path, shift: str | None = None, seed: int = 0) -> Path:
    """An ImageFolder copy of ``files`` (symlinks, or shifted PNGs), keeping class subfolders."""
    from PIL import Image
    for i, f in enumerate(files):
        target = out / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if shift is None:
            target.symlink_to(f.resolve())
        else:
            with Image.open(f) as img:
                apply_shift(img.convert("RGB"), shift, seed + i).save(target.with_suffix(".png"))
    return out


def _measure(ee, data_dir: Path, info, label: str) -> dict:
    """Live agreement and hit rates as the serving monitor sees them, plus FLOPs, on one folder."""
    dataset = ImageFolderData(data_dir, info)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    monitor = TrafficMonitor(MonitorConfig(shadow_fraction=1.0, seed=0))
    with torch.inference_mode():
        for x, _, _ in loader:
            monitor.observe(x, ee(x), list(ee.thresholds), ee.backbone, "bench")
    snap = monitor.snapshot()
    result = evaluate(ee, loader, latency=False, progress=False)
    return {"label": label, "samples": snap["items"], "live_agreement": snap["live_agreement"],
            "hit_rates": snap["hit_rates"], "flops_fraction": result.flops_fraction,
            "accuracy_backbone": result.accuracy_backbone, "accuracy_early_exit": result.accuracy_early_exit}


def run(args) -> dict:
    quiet_libraries()
    torch.manual_seed(args.seed)
    root = Path(args.data) if args.data else shared_dir() / "data" / "cifar10-test"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    random.Random(args.seed).shuffle(files)
    a, b, c = (files[:args.n_build], files[args.n_build:args.n_build + args.n_log],
               files[args.n_build + args.n_log:args.n_build + args.n_log + args.n_test])
    work = Path(args.work or tempfile.mkdtemp(prefix="selfxit-drift-"))
    timings = {}
    t = time.perf_counter()
    dirs = {"A": _link_subset(a, root, work / "A"), "B": _link_subset(b, root, work / "B"),
            "C_clean": _link_subset(c, root, work / "C_clean"),
            "C_shift": _link_subset(c, root, work / "C_shift", args.shift, seed=10_000 + args.seed)}
    timings["prepare"] = time.perf_counter() - t
    commands = [
        ["enable", "--model", args.model, "--data", str(dirs["A"]), "--tolerance", str(args.tolerance),
         "--out", str(work / "stale"), "--seed", str(args.seed)],
        ["collect", "--model", args.model, "--data", str(dirs["B"]), "--log", str(work / "log"),
         "--transform", args.shift, "--seed", str(args.seed)],
    ]
    for name, cmd in zip(("enable", "collect"), commands):
        t = time.perf_counter()
        print("$ selfxit " + " ".join(cmd), flush=True)
        if main(cmd) != 0:
            raise SystemExit(f"selfxit {name} failed")
        timings[name] = time.perf_counter() - t
    model, info = load_backbone(args.model)
    store = BundleStore(work / "bundles")
    store.publish(work / "stale", reason="built on clean traffic")
    stale = selfxit.load(store.current_path, model)
    rows = [_measure(stale, dirs["C_clean"], info, "stale bundle, clean traffic"),
            _measure(stale, dirs["C_shift"], info, f"stale bundle, {args.shift} traffic")]
    t = time.perf_counter()
    result = retrain(work / "log", store, model, info, RetrainConfig(since=None, seed=args.seed))
    timings["retrain"] = time.perf_counter() - t
    print(summary(result))
    fresh = selfxit.load(store.current_path, model)
    rows.append(_measure(fresh, dirs["C_shift"], info, f"{'retrained' if result.published else 'kept (not published)'}, "
                                                        f"{args.shift} traffic"))
    print(f"\nResNet-56 drift ({args.shift}), tolerance {args.tolerance}; held-out set C of {len(c)} images; "
          f"bundle built on {len(a)} clean, retrained on {len(b)} logged {args.shift} images")
    print(f"{'':<40}{'live agreement':>15}{'FLOPs fraction':>16}{'acc. backbone':>15}{'acc. early-exit':>17}  hit rates")
    for r in rows:
        hits = ", ".join(f"{k} {v:.2f}" for k, v in r["hit_rates"].items())
        print(f"{r['label']:<40}{r['live_agreement']:>15.4f}{r['flops_fraction']:>16.3f}"
              f"{r['accuracy_backbone']:>15.3f}{r['accuracy_early_exit']:>17.3f}  {hits}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    out = {"shift": args.shift, "tolerance": args.tolerance, "rows": rows, "retrain": result.to_dict(),
           "seconds": timings, "work": str(work)}
    (work / "drift.json").write_text(json.dumps(out, indent=1))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--data", help="default: the shared CIFAR-10 test images")
    p.add_argument("--shift", default="blur", choices=["blur", "noise", "brightness"])
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--n-build", type=int, default=4000)
    p.add_argument("--n-log", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working folder (default: a new temp folder, kept)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
