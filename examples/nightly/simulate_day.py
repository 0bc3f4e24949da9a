"""Simulate a day of served traffic and run the nightly job end to end, with a real server.

1. build a bundle on clean images (`selfxit enable`) and publish it into BUNDLES;
2. start `selfxit serve --bundle BUNDLES/current --log LOG` on loopback;
3. send the day's traffic over HTTP: images under a shift (blur by default), as PNG uploads;
   the server answers, logs every item and shadow-runs a fraction of them;
4. print what the server's monitor saw (live agreement with the backbone, hit rates);
5. run the nightly job (`selfxit retrain --log LOG --out BUNDLES --since 24h`);
6. the server picks up a published version by itself; send more shifted traffic and print the
   monitor again.

    .venv/bin/python examples/nightly/simulate_day.py [--shift blur] [--work DIR]

Takes about 10 minutes on 2 CPU cores with the defaults. Everything stays under --work.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from selfxit.cli import main as selfxit
from selfxit.ops.shift import apply_shift
from selfxit.ops.versions import BundleStore
from selfxit.settings import shared_dir
from selfxit.zoo.data import IMAGE_EXTENSIONS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _folder(files: list[Path], root: Path, out: Path) -> Path:
    for f in files:
        target = out / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f.resolve())
    return out


def _send(client: httpx.Client, files: list[Path], shift: str, seed: int, per_request: int = 16) -> None:
    for start in range(0, len(files), per_request):
        uploads = []
        for i, f in enumerate(files[start:start + per_request]):
            with Image.open(f) as img:
                buf = io.BytesIO()
                apply_shift(img.convert("RGB"), shift, seed + start + i).save(buf, format="PNG")
            uploads.append(("files", (f"{f.stem}.png", buf.getvalue(), "image/png")))
        response = client.post("/v1/predict", files=uploads)
        response.raise_for_status()


def _show(client: httpx.Client, title: str) -> dict:
    m = client.get("/v1/monitor").json()
    gen = client.get("/healthz").json()["bundle"]
    agreement = "n/a" if m["live_agreement"] is None else f"{m['live_agreement']:.4f}"
    hits = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["hit_rates"].items()))
    print(f"[{title}] bundle generation {gen['generation']}: {m['items']} items, live agreement {agreement} "
          f"on {m['shadow_samples']} shadow runs; hit rates {hits}; logged {m['logging']['logged']}", flush=True)
    return m


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--shift", default="blur", choices=["blur", "noise", "brightness"])
    p.add_argument("--tolerance", default="0.05")
    p.add_argument("--build", type=int, default=3000, help="clean images for the first bundle")
    p.add_argument("--day", type=int, default=3000, help="shifted images served during the day")
    p.add_argument("--after", type=int, default=500, help="shifted images served after the nightly job")
    p.add_argument("--work", help="working folder (default: a new temp folder)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="selfxit-day-"))
    root = shared_dir() / "data" / "cifar10-test"
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    random.Random(0).shuffle(files)
    build, day, after = (files[:args.build], files[args.build:args.build + args.day],
                         files[args.build + args.day:args.build + args.day + args.after])
    bundles, log = work / "bundles", work / "traffic"

    print("== 1. first bundle, built on clean images", flush=True)
    if selfxit(["enable", "--model", args.model, "--data", str(_folder(build, root, work / "clean")),
                "--tolerance", args.tolerance, "--out", str(work / "first")]) != 0:
        raise SystemExit("enable failed")
    BundleStore(bundles).publish(work / "first", reason="first bundle")

    print("== 2. serving BUNDLES/current with a traffic log", flush=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "selfxit", "serve", "--bundle", str(bundles / "current"),
                               "--model", args.model, "--port", str(port), "--log", str(log), "--log-fraction", "1",
                               "--shadow-fraction", "0.2", "--reload-poll-s", "1", "--threads", "1"],
                              env={**os.environ, "NNI_FRAMEWORK": "none"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(120):
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(1)
            print(f"== 3. a day of {args.shift} traffic: {len(day)} images", flush=True)
            _send(client, day, args.shift, seed=0)
            time.sleep(2)  # the log flushes every second
            _show(client, "end of day")

            print("== 4. the nightly job", flush=True)
            code = selfxit(["retrain", "--log", str(log), "--model", args.model, "--out", str(bundles),
                            "--since", "24h"])
            if code != 0:
                raise SystemExit("retrain failed")
            published = BundleStore(bundles).current()
            for _ in range(30):  # the server reloads BUNDLES/current by itself
                if client.get("/healthz").json()["bundle"]["generation"] > 1 or published == "v000001":
                    break
                time.sleep(1)
            before = client.get("/v1/monitor").json()
            print(f"== 5. {len(after)} more {args.shift} images", flush=True)
            _send(client, after, args.shift, seed=100_000)
            time.sleep(1)
            now = _show(client, "after the nightly job (cumulative)")
            shadow = now["shadow_samples"] - before["shadow_samples"]
            if shadow and before["live_agreement"] is not None:
                agree = (now["live_agreement"] * now["shadow_samples"]
                         - before["live_agreement"] * before["shadow_samples"]) / shadow
                print(f"   live agreement since the nightly job: {agree:.4f} on {shadow} shadow runs")
    finally:
        server.terminate()
        server.wait(20)
    print(f"versions: {[v.name for v in BundleStore(bundles).versions()]}, current {BundleStore(bundles).current()}")
    print(f"everything is under {work}")
    if not args.work:
        print(f"(remove it with: rm -r {work})")


if __name__ == "__main__":
    main()
