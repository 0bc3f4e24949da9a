"""Probes of a Ray Serve deployment of selfxit: a bundle publish under load, and a replica killed under load.

Real processes on one machine: a local Ray (``ray.init(num_cpus=...)``, 127.0.0.1 only), Ray Serve's proxy and
N replicas, and client threads posting real JPEGs from the shared CIFAR-10 folder. ``tests/serve/test_ray_serve.py``
runs the same probes at smaller sizes. Figures (all counted at the clients):

- ``publish``: requests sent / answered 200 / failed during a load of ``clients`` x ``seconds`` with a new bundle
  version published half-way, and each replica's version afterwards (the target: 0 failed, all on the new one);
- ``kill``: requests failed when one replica process is SIGKILLed half-way (at most those in flight on it), and
  the seconds until every client had an answer again (target: within 10 s).

    .venv/bin/python benchmarks/ray_serve.py --clients 8 --seconds 30
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """``clients`` threads posting ``payload`` to ``url`` back to back until stopped; every answer is recorded."""

    def __init__(self, url: str, files: list[tuple[str, bytes]], clients: int = 8, timeout_s: float = 30.0):
        self.url, self.files, self.clients, self.timeout_s = url, files, clients, timeout_s
        self.results: list[tuple[float, float, int | str, str | None]] = []  # (start, end, status or error, version)
        self.errors: list[str] = []  # the first few bodies of failed answers
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            i = k
            while not self._stop.is_set():
                name, data = self.files[i % len(self.files)]
                i += self.clients
                start = time.monotonic()
                try:
                    r = client.post(self.url, files=[("files", (name, data, "image/jpeg"))])
                    outcome: int | str = r.status_code
                    version = r.json().get("version") if r.status_code == 200 else None
                    if r.status_code != 200 and len(self.errors) < 5:
                        self.errors.append(r.text[:300])
                except httpx.HTTPError as exc:
                    outcome, version = type(exc).__name__, None
                with self._lock:
                    self.results.append((start, time.monotonic(), outcome, version))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def summary(self) -> dict:
        with self._lock:
            results = list(self.results)
        outcomes = Counter(str(r[2]) for r in results)
        return {"sent": len(results), "ok": outcomes.get("200", 0),
                "failed": len(results) - outcomes.get("200", 0), "outcomes": dict(outcomes),
                "versions": dict(Counter(r[3] for r in results if r[3] is not None)), "errors": self.errors}


def healthz(base: str) -> dict:
    return httpx.get(f"{base}/healthz", timeout=10).json()


def wait_versions(base: str, version: str, replicas: int, timeout_s: float = 30.0) -> dict:
    """Poll /healthz until ``replicas`` live replicas serve ``version``; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = healthz(base)
        live = [v for v in state["versions"].values()]
        if (len(live) >= replicas and all(v == version for v in live)) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def publish_probe(base: str, store, bundle: Path, files, clients: int, seconds: float, replicas: int) -> dict:
    """Publish ``bundle`` into ``store`` half-way through a load; the load's counts and the versions after."""
    with Load(f"{base}/v1/predict", files, clients) as load:
        time.sleep(seconds / 2)
        published_at = time.monotonic()
        version = store.publish(bundle, reason="probe: publish under load")
        time.sleep(seconds / 2)
    state = wait_versions(base, version, replicas)
    switched = [r[0] - published_at for r in load.results if r[3] == version]
    return {**load.summary(), "published": version, "versions_after": state["versions"],
            "first_new_answer_after_s": round(min(switched), 2) if switched else None}


def kill_probe(base: str, files, clients: int, seconds: float) -> dict:
    """SIGKILL one replica process half-way through a load: requests failed, and the recovery time (the last
    failure's end to the first success after it, at the clients)."""
    pid = healthz(base)["pid"]  # the process of the replica that answered this health check
    with Load(f"{base}/v1/predict", files, clients) as load:
        time.sleep(seconds / 2)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        time.sleep(seconds / 2)
    failures = [r for r in load.results if r[2] != 200]
    after = [r for r in load.results if r[0] >= killed_at]
    last_failure = max((r[1] for r in failures), default=killed_at)
    recovered = [r[1] for r in after if r[2] == 200 and r[0] >= last_failure]
    in_flight = sum(1 for r in load.results if r[0] <= killed_at <= r[1])
    return {**load.summary(), "killed_pid": pid, "in_flight_at_kill": in_flight,
            "answering_again_after_s": round(min(recovered) - killed_at, 2) if recovered else None}


def main() -> None:
    import argparse
    import json
    import tempfile

    import ray
    import torch
    from ray import serve

    from selfxit.ops.ray_cluster import connect
    from selfxit.ops.versions import BundleStore
    from selfxit.serve.config import ServeConfig
    from selfxit.serve.ray_config import RayServeConfig
    from selfxit.serve.ray_serve import ray_app
    from selfxit.serve.ray_state import kill_board
    from selfxit.settings import shared_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="selfxit-ray-bench-"))
    first, second = quick_bundles(work)
    store = BundleStore(work / "store")
    store.publish(first, reason="benchmark: first")
    files = [(p.name, p.read_bytes()) for p in sorted((shared_dir() / "data" / "cifar10-test").glob("*/000*.jpg"))]
    port = free_port()
    connect(num_cpus=args.cpus)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(store.root, "cifar_resnet20", config=ServeConfig(shadow_fraction=0.05),
                          ray_config=RayServeConfig(replicas=args.replicas, replica_cpus=args.cpus / (args.replicas + 1))),
                  name="selfxit", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        out = {"publish": publish_probe(base, store, second, files, args.clients, args.seconds, args.replicas),
               "kill": kill_probe(base, files, args.clients, args.seconds)}
        print(json.dumps(out, indent=1))
    finally:
        kill_board("selfxit")
        serve.shutdown()
        ray.shutdown()


def quick_bundles(work: Path) -> tuple[Path, Path]:
    """Two ResNet-20 bundles with one untrained head each (built directly, no fitting), different thresholds."""
    import torch

    from selfxit.api import EarlyExitModel
    from selfxit.core.candidates import Candidate
    from selfxit.core.exits import ExitRecord
    from selfxit.core.heads import DEFAULT_HEAD, build_head
    from selfxit.zoo import load_backbone

    model, _ = load_backbone("cifar_resnet20")
    cand = Candidate("layer2", (32, 16, 16), 1)
    out = []
    for k, threshold in enumerate((0.105, 0.2)):
        ee = EarlyExitModel(model, (3, 32, 32), 10, [cand], backbone_flops=2)
        torch.manual_seed(k)
        ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, 10), 1.0, threshold,
                                   spec=DEFAULT_HEAD, shape=cand.shape, head_flops=1)])
        out.append(ee.save(work / f"bundle{k}"))
    return out[0], out[1]


if __name__ == "__main__":
    main()
