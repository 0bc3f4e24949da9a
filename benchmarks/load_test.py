"""Load test: the early-exit server against the same server running the plain backbone (``--plain``).

Starts both servers as subprocesses on free 127.0.0.1 ports, sends a bounded number of
requests (real JPEGs from the shared CIFAR-10 folder, multipart; ``--raw``: one image as the whole
body, Content-Type image/jpeg) from 1, 8 and 32 concurrent clients, and prints throughput, p50 and p99
latency for both and their ratios (early-exit / plain).

    .venv/bin/python benchmarks/load_test.py --bundle BUNDLE --model cifar_resnet56 --requests 300

``--launcher SCRIPT`` runs ``python SCRIPT serve ...`` instead of ``python -m selfxit serve ...`` (same
arguments), for a backbone that cannot be loaded by name (``benchmarks/lite_server.py``: EfficientNet-Lite0).

Client and server share this machine's cores, so absolute figures include the client's own cost;
the ratios compare the two servers under the same load.
"""
import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfxit.settings import shared_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m selfxit serve`` on 127.0.0.1, stopped on exit."""

    def __init__(self, args, plain: bool):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launcher = [str(args.launcher)] if args.launcher else ["-m", "selfxit"]
        cmd = [sys.executable, *launcher, "serve", "--bundle", str(args.bundle), "--model", args.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--max-wait-ms", str(args.max_wait_ms),
               "--max-batch", str(max(64, args.images_per_request)), "--reload-poll-s", "0",
               "--threads", str(args.server_threads), "--max-queue-wait-ms", str(args.max_queue_wait_ms)]
        if args.weights:
            cmd += ["--weights", str(args.weights)]
        if plain:
            cmd.append("--plain")
        cmd += shlex.split(args.serve_args)  # the same runtime for both, e.g. --device cuda --compile cudagraph
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "NNI_FRAMEWORK": "none"},
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server failed to start:\n{self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise SystemExit("server did not answer /healthz within 120 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def exit_rates(self) -> dict[str, int]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        rates = {}
        for line in text.splitlines():
            if line.startswith("selfxit_exit_items_total{"):
                rates[line.split('"')[1]] = int(float(line.split()[-1]))  # prometheus-client writes 12.0
        return rates


async def run_level(url: str, payloads: list[bytes], concurrency: int, requests: int, max_seconds: float,
                    images: int, raw: bool = False) -> dict:
    """``requests`` requests from ``concurrency`` clients (stopping early at ``max_seconds``); ``raw``: each
    request's one image is the whole body (image/jpeg) instead of a multipart form."""
    latencies, errors, issued = [], 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker():
            nonlocal errors, issued
            while issued < requests and time.perf_counter() < deadline:
                k = issued
                issued += 1
                t0 = time.perf_counter()
                if raw:
                    response = await client.post("/v1/predict", content=payloads[k % len(payloads)],
                                                 headers={"content-type": "image/jpeg"})
                else:
                    files = [("files", (f"{i}.jpg", payloads[(k * images + i) % len(payloads)], "image/jpeg"))
                             for i in range(images)]
                    response = await client.post("/v1/predict", files=files)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": wall,
            "items_per_s": len(latencies) * images / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan")}


def measure(args, payloads: list[bytes]) -> tuple[list[dict], list[dict], dict]:
    """Both servers up at once (idle one costs nothing); at each level run one, then the other, to share drift."""
    with Server(args, plain=False) as early, Server(args, plain=True) as plain:
        results = {early: [], plain: []}
        for k, c in enumerate(args.concurrency):
            for server in ((early, plain) if k % 2 == 0 else (plain, early)):
                # warm up at this concurrency too: new batch sizes cost a first-time kernel setup
                asyncio.run(run_level(server.url, payloads, c, args.warmup, 30, args.images_per_request, args.raw))
                results[server].append(asyncio.run(run_level(server.url, payloads, c, args.requests,
                                                              args.max_seconds, args.images_per_request, args.raw)))
        return results[early], results[plain], early.exit_rates()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", type=Path)
    p.add_argument("--data", type=Path, default=shared_dir() / "data" / "cifar10-test",
                   help="image folder (JPEG/PNG, searched recursively)")
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency level (bounded)")
    p.add_argument("--max-seconds", type=float, default=60, help="time cap per concurrency level")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--raw", action="store_true",
                   help="send each image as the whole body (Content-Type image/jpeg), not multipart; one per request")
    p.add_argument("--launcher", type=Path,
                   help="a script run as `python SCRIPT serve ...` instead of `python -m selfxit serve ...`")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads per server (default 1: the client needs a core too, and spinning "
                        "OpenMP threads on busy shared cores make every batch wait for the slowest)")
    p.add_argument("--warmup", type=int, default=40, help="unmeasured requests before each level")
    p.add_argument("--max-queue-wait-ms", type=float, default=60_000,
                   help="the servers' admission deadline (default 60 s: off, so capacity is measured, not shed; "
                        "503s would count as errors)")
    p.add_argument("--serve-args", default="",
                   help="more `serve` arguments for both servers, e.g. '--device cuda --compile cudagraph' (the "
                        "bucketed runtime: the plain backbone is then padded and captured the same way)")
    p.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = p.parse_args()
    if args.requests < 1 or args.max_seconds <= 0:
        raise SystemExit("--requests must be >= 1 and --max-seconds > 0")
    if args.raw and args.images_per_request != 1:
        raise SystemExit("--raw sends one image per request: drop --images-per-request or set it to 1")

    files = sorted(f for f in args.data.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no JPEG/PNG images under {args.data}")
    step = max(1, len(files) // 512)
    payloads = [f.read_bytes() for f in files[::step][:512]]  # spread over the classes

    early, plain, rates = measure(args, payloads)
    total = sum(rates.values()) or 1
    print(f"\nbundle {args.bundle} on {args.model}; {args.images_per_request} image(s)/request "
          f"({'raw image/jpeg body' if args.raw else 'multipart'}), "
          f"max-wait {args.max_wait_ms:g} ms, {args.server_threads} torch thread(s)/server")
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(rates.items()))
    print(f"exits taken by the early-exit server: {shares}")
    header = (f"{'clients':>7} {'requests':>9} | {'items/s EE':>10} {'plain':>8} {'ratio':>6} | "
              f"{'p50 ms EE':>9} {'plain':>7} {'ratio':>6} | {'p99 ms EE':>9} {'plain':>7} {'ratio':>6}")
    print(header + "\n" + "-" * len(header))
    for e, b in zip(early, plain):
        print(f"{e['concurrency']:>7} {e['requests']:>4}/{b['requests']:<4} | "
              f"{e['items_per_s']:>10.1f} {b['items_per_s']:>8.1f} {e['items_per_s'] / b['items_per_s']:>6.2f} | "
              f"{e['p50_ms']:>9.1f} {b['p50_ms']:>7.1f} {e['p50_ms'] / b['p50_ms']:>6.2f} | "
              f"{e['p99_ms']:>9.1f} {b['p99_ms']:>7.1f} {e['p99_ms'] / b['p99_ms']:>6.2f}")
        if e["errors"] or b["errors"]:
            print(f"        errors: early-exit {e['errors']}, plain {b['errors']}")
    print("ratio = early-exit / plain: throughput above 1 and latency below 1 favour early exits")
    if args.json:
        print(json.dumps({"early_exit": early, "plain": plain, "exit_counts": rates}))


if __name__ == "__main__":
    main()
