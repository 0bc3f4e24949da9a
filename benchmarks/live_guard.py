"""The live guard on a real server: how fast it alarms after a shift, what it costs and what it gives back.

A real ``selfxit serve`` process serves the ResNet-56 5% bundle (built with ``selfxit enable`` unless
``--bundle`` is given). The benchmark streams shared CIFAR-10 images to it (JSON tensors, in seeded orders;
images are replayed in new orders when more are needed) that start clean and turn blurred
(:func:`selfxit.ops.shift.apply_shift`) at a known item. For each shadow fraction on the command line it
measures, with ``--guard``:

* items and guard shadow samples from the shift to the first alarm (a tighten), read from ``/v1/monitor``
  after every request, and any alarm before the shift (a false alarm);
* live agreement per window of ``--window`` items, guard on and off (the same stream served without
  ``--guard``), against the backbone run in this process;
* the FLOPs given back while tightened: mean FLOPs fraction (from the exit each item took) after the alarm,
  guard on minus guard off, on the same items.

False alarms on clean traffic are counted offline over ``--clean-replays`` seeded replays of clean images,
feeding a :class:`~selfxit.serve.live_guard.LiveGuard` every item as a shadow sample (the no-shrink pass the
server runs, here in this process: shadow fraction 1 is the worst case, the most evidence per item).

    .venv/bin/python benchmarks/live_guard.py --items 3000 --shift-at 1000 --fractions 0.1 0.5
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import selfxit  # noqa: E402
from selfxit.cli.common import quiet_libraries  # noqa: E402
from selfxit.evaluate.evaluation import cost_per_exit  # noqa: E402
from selfxit.ops.shift import apply_shift  # noqa: E402
from selfxit.serve.guarding import BundleGuard  # noqa: E402
from selfxit.serve.live_guard import GuardConfig, LiveGuard  # noqa: E402
from selfxit.settings import shared_dir  # noqa: E402
from selfxit.zoo import load_backbone  # noqa: E402
from selfxit.zoo.data import IMAGE_EXTENSIONS, image_transform  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _stream(files, transform, n: int, shift_at: int | None, shift: str, strength: float | None, seed: int):
    """n inputs: the files in seeded orders (a new order each pass), shifted from item ``shift_at`` on."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(files)).tolist())
    xs = []
    for k, i in enumerate(order[:n]):
        with Image.open(files[i]) as img:
            rgb = img.convert("RGB")
            if shift_at is not None and k >= shift_at:
                rgb = apply_shift(rgb, shift, seed + k, strength)
            xs.append(transform(rgb))
    return torch.stack(xs)


def _backbone(model, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()


def _serve(bundle: Path, model: str, x: torch.Tensor, batch: int, extra: list[str], shift_at: int, log_dir: Path):
    """Stream ``x`` to a fresh server; returns classes, exits, failures and the guard trace."""
    import httpx
    port = _free_port()
    out = open(log_dir / f"server-{port}.log", "w+")
    cmd = [sys.executable, "-m", "selfxit", "serve", "--bundle", str(bundle), "--model", model, "--port", str(port),
           "--threads", "1", "--max-wait-ms", "2", "--reload-poll-s", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    guarded = "--guard" in extra
    classes = np.full(len(x), -1)
    exits: list[str] = ["?"] * len(x)
    failed, trace = 0, []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    raise RuntimeError(f"server exited {proc.returncode}: {out.read()[-2000:]}")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up")
                time.sleep(0.2)
            t0 = time.perf_counter()
            for start in range(0, len(x), batch):
                r = client.post("/v1/predict", json={"inputs": x[start:start + batch].tolist()})
                if r.status_code != 200:
                    failed += 1
                    continue
                for item in r.json()["items"]:
                    classes[start + item["index"]] = item["class"]
                    exits[start + item["index"]] = item["exit"]
                if guarded:
                    g = client.get("/v1/monitor").json()["guard"]
                    trace.append((start + batch, g["shadow_samples"], g["tightened"], g["scale"], g["alarmed"]))
            seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
        out.close()
    return {"classes": classes, "exits": exits, "failed": failed, "trace": trace, "seconds": seconds}


def _alarm(trace, shift_at: int) -> dict:
    """Items and shadow samples from the shift to the first tighten, and tightens before the shift."""
    at_shift = next((s for items, s, *_ in trace if items >= shift_at), None)
    before = max((t for items, _, t, *_ in trace if items <= shift_at), default=0)
    first = next(((items, s) for items, s, t, *_ in trace if t > before and items > shift_at), None)
    final = trace[-1] if trace else (0, 0, 0, None, False)
    return {"false_alarms": before, "items": None if first is None else first[0] - shift_at,
            "shadow": None if first is None or at_shift is None else first[1] - at_shift,
            "alarm_item": None if first is None else first[0], "final_scale": final[3], "tightens": final[2]}


def _windows(classes, reference, window: int) -> list[float]:
    return [float(np.mean(classes[i:i + window] == reference[i:i + window])) for i in range(0, len(classes), window)]


def _clean_false_alarms(bundle_ee, x: torch.Tensor, replays: int, items: int, alpha: float, seed: int) -> tuple[int, int]:
    """(alarms, samples fed) over seeded clean replays, every item a shadow sample (offline, same pass)."""
    bg = BundleGuard(bundle_ee, GuardConfig(alpha=alpha, base_shadow=1.0, max_shadow=1.0))
    with torch.inference_mode():
        outs = [bg.shadow(x[i:i + 256]) for i in range(0, len(x), 256)]
    backbone = torch.cat([o.logits.argmax(1) for o in outs]).tolist()
    preds = torch.cat([o.exit_predictions for o in outs], 1).t().tolist()
    scores = torch.cat([o.exit_confidence for o in outs], 1).float().t().tolist()
    rng = np.random.default_rng(seed)
    alarms = fed = 0
    for _ in range(replays):
        guard = LiveGuard(bundle_ee.family, GuardConfig(alpha=alpha, base_shadow=1.0, max_shadow=1.0))
        order = np.concatenate([rng.permutation(len(x)) for _ in range(items // len(x) + 1)])[:items]
        for i in order:
            fed += 1
            move = guard.observe(backbone[i], preds[i], scores[i])
            if move is not None and move.kind == "tighten":
                alarms += 1
                break
    return alarms, fed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="a certified bundle (default: build the ResNet-56 5%% one)")
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--data", type=Path, default=shared_dir() / "data" / "cifar10-test")
    p.add_argument("--items", type=int, default=6000, help="items per served stream")
    p.add_argument("--shift-at", type=int, help="first shifted item (default: items // 3)")
    p.add_argument("--shift", default="blur", choices=["blur", "noise", "brightness"])
    p.add_argument("--strength", type=float, help="shift strength (default: apply_shift's)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.5], help="shadow fractions")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--max-shadow", type=float, help="--guard-max-shadow (default: the server's)")
    p.add_argument("--window", type=int, default=500)
    p.add_argument("--batch", type=int, default=16, help="items per request")
    p.add_argument("--clean-replays", type=int, default=20)
    p.add_argument("--clean-items", type=int, default=2000, help="items per clean replay")
    p.add_argument("--clean-pool", type=int, default=2000, help="distinct clean images the replays draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    work = args.work or Path(tempfile.mkdtemp(prefix="live_guard-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle
    if bundle is None:
        bundle = work / "bundle"
        if not (bundle / "manifest.json").exists():
            cmd = [sys.executable, "-m", "selfxit", "enable", "--model", args.model, "--data", str(args.data),
                   "--tolerance", "0.05", "--out", str(bundle)]
            print("building the bundle:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    shift_at = args.shift_at if args.shift_at is not None else args.items // 3
    model, info = load_backbone(args.model)
    ee = selfxit.load(bundle, model)
    if ee.family is None or ee.family.scale is None:
        raise SystemExit(f"{bundle}: no certified family/scale, nothing to guard")
    names = list(ee.thresholds) + ["final"]
    cost = dict(zip(names, cost_per_exit(ee) / ee.backbone_flops))
    files = _files(args.data)
    transform = image_transform(info)
    t0 = time.perf_counter()
    x = _stream(files, transform, args.items, shift_at, args.shift, args.strength, args.seed)
    reference = _backbone(model, x)
    print(f"stream: {args.items} items ({shift_at} clean, then {args.shift}); bundle {bundle} certified scale "
          f"{ee.family.scale} on {list(ee.family.shape)} (prepared in {time.perf_counter() - t0:.0f} s)", flush=True)

    runs = {"off": _serve(bundle, args.model, x, args.batch, [], shift_at, work)}
    for f in args.fractions:
        extra = ["--guard", "--shadow-fraction", str(f), "--guard-alpha", str(args.alpha)]
        if args.max_shadow is not None:
            extra += ["--guard-max-shadow", str(args.max_shadow)]
        runs[f"on@{f:g}"] = _serve(bundle, args.model, x, args.batch, extra, shift_at, work)
        print(f"ran shadow fraction {f:g} in {runs[f'on@{f:g}']['seconds']:.0f} s", flush=True)

    off_cost = np.array([cost.get(e, np.nan) for e in runs["off"]["exits"]])
    rows = []
    for name, run in runs.items():
        agree = _windows(run["classes"], reference, args.window)
        run_cost = np.array([cost.get(e, np.nan) for e in run["exits"]])
        row = {"run": name, "failed": run["failed"], "flops": np.nanmean(run_cost),
               "clean_agree": float(np.mean(run["classes"][:shift_at] == reference[:shift_at])),
               "shift_agree": float(np.mean(run["classes"][shift_at:] == reference[shift_at:])), "windows": agree}
        if name != "off":
            alarm = _alarm(run["trace"], shift_at)
            row.update(alarm)
            if alarm["alarm_item"] is not None:
                after = slice(alarm["alarm_item"], None)
                row["given_back"] = float(np.nanmean(run_cost[after]) - np.nanmean(off_cost[after]))
                row["after_agree"] = float(np.mean(run["classes"][after] == reference[after]))
                row["after_agree_off"] = float(np.mean(runs["off"]["classes"][after] == reference[after]))
        rows.append(row)

    pool = _stream(files, transform, min(args.clean_pool, len(files)), None, args.shift, None, args.seed + 1)
    alarms, fed = _clean_false_alarms(ee, pool, args.clean_replays, args.clean_items, args.alpha, args.seed + 2)

    def fmt(v, spec=".4f"):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)

    print(f"\nlive guard, {args.model}, tolerance {ee.family.tolerance:g}, alpha {args.alpha:g}, shift {args.shift} at "
          f"item {shift_at} of {args.items}, windows of {args.window} items\n")
    print("| run | failed | alarm: items after shift | alarm: shadow samples | false alarms before shift | "
          "tightens / final scale | agreement clean / shifted | after alarm: agreement on vs off | "
          "FLOPs given back after alarm | FLOPs fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        on = r["run"] != "off"
        print(f"| {r['run']} | {r['failed']} | {fmt(r.get('items'), 'd') if on else '-'} | "
              f"{fmt(r.get('shadow'), 'd') if on else '-'} | {r.get('false_alarms', '-')} | "
              f"{str(r.get('tightens', '-')) + ' / ' + fmt(r.get('final_scale'), 'g') if on else '-'} | "
              f"{r['clean_agree']:.4f} / {r['shift_agree']:.4f} | "
              f"{fmt(r.get('after_agree')) + ' vs ' + fmt(r.get('after_agree_off')) if on else '-'} | "
              f"{fmt(r.get('given_back'), '+.4f') if on else '-'} | {r['flops']:.4f} |")
    print("\nagreement per window (window: first item):")
    print("| run | " + " | ".join(str(i * args.window) for i in range(len(rows[0]["windows"]))) + " |")
    print("|---|" + "---|" * len(rows[0]["windows"]))
    for r in rows:
        print(f"| {r['run']} | " + " | ".join(f"{a:.3f}" for a in r["windows"]) + " |")
    print(f"\nclean replays (offline, every item a shadow sample): {alarms} false alarms in {args.clean_replays} "
          f"replays of {args.clean_items} items ({fed} samples fed, pool of {len(pool)} images)")


if __name__ == "__main__":
    main()
