"""Reliability probes of a `selfxit serve` process: malformed requests, bad WebSocket messages, overload, SIGTERM.

Everything goes through loopback sockets, as a client would see it; nothing here imports selfxit (the
input shape and limits are read from the server's own ``/openapi.json``). Each probe returns a dict of
counts, so ``benchmarks/reliability.py`` and the tests in ``tests/serve`` can run the same code at
different sizes::

    from reliability_serve import run_serve_reliability
    figures = run_serve_reliability("bundle/", "cifar_resnet20", malformed=10_000, ws_messages=400,
                                    load_clients=32, load_seconds=60)

The figures that must be 0: ``server_errors`` (5xx other than 503 with Retry-After), ``resets``,
``hangs``, ``unexpected_drops``, ``good_failed``; for WebSocket ``ws_server_errors``, ``ws_drops``,
``ws_hangs``; under load ``resets``, ``bad_503`` (503 without Retry-After), ``other``; on SIGTERM
``cut_off`` and ``in_flight_lost``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reliability_cases, also when imported by path
from reliability_cases import (  # noqa: E402
    HttpCase,
    good_cases,
    http_cases,
    input_spec,
    png,
    slow_cases,
    ws_messages,
)

ROOT = Path(__file__).resolve().parents[1]
WS_PROPER_CLOSE = {1000, 1001, 1007, 1008, 1009, 1012, 1013}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m selfxit serve`` on a free 127.0.0.1 port (a context manager; stopped with SIGTERM on exit)."""

    def __init__(self, bundle, model: str, extra: list[str] | tuple[str, ...] = (), weights=None,
                 startup_s: float = 120.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "selfxit", "serve", "--bundle", str(bundle), "--model", model,
                    "--host", "127.0.0.1", "--port", str(self.port), "--reload-poll-s", "0", "--threads", "1",
                    *(["--weights", str(weights)] if weights else []), *extra]
        self.startup_s, self.env = startup_s, env or {}
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        env = {**os.environ, "NNI_FRAMEWORK": "none", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"server did not answer /healthz within {self.startup_s} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def openapi(self) -> dict:
        return httpx.get(f"{self.url}/openapi.json", timeout=10).json()


# ---- one raw HTTP exchange ------------------------------------------------------------------------------
def _parse_head(data: bytes) -> tuple[int | None, dict[str, str], int]:
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None, {}, len(head) + 4
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, len(head) + 4


def exchange(port: int, case: HttpCase, timeout: float) -> tuple[str, int | None, dict[str, str]]:
    """Send one raw request; (outcome, status, headers): outcome is 'answer', 'closed', 'reset', 'timeout'
    or 'refused'. A reset after a complete answer (the server closing while we still sent) counts as the answer."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused", None, {}
    data = b""
    try:
        try:
            sock.sendall(case.data)
            for chunk in case.chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and stopped reading: read what it said
        while True:
            status, headers, body_at = _parse_head(data) if b"\r\n\r\n" in data else (None, {}, 0)
            if status is not None and "content-length" in headers \
                    and len(data) >= body_at + int(headers["content-length"] or 0):
                return "answer", status, headers
            chunk = sock.recv(65536)
            if not chunk:
                return ("answer", status, headers) if status is not None else ("closed", None, {})
            data += chunk
    except socket.timeout:
        return "timeout", None, {}
    except ConnectionResetError:
        status, headers, _ = _parse_head(data) if b"\r\n\r\n" in data else (None, {}, 0)
        return ("answer", status, headers) if status is not None else ("reset", None, {})
    finally:
        sock.close()


def judge(case: HttpCase, outcome: str, status: int | None, headers: dict[str, str]) -> str:
    """'ok' or the failure's name (server_errors, resets, hangs, unexpected_drops, good_failed, wrong_status)."""
    if outcome == "timeout":
        return "hangs"
    if outcome in ("reset", "refused"):
        return "resets"
    if outcome == "closed":
        return "ok" if case.expect == "4xx_or_close" else "unexpected_drops"
    assert status is not None
    if status == 503 and headers.get("retry-after"):
        return "ok"  # busy: a proper, retryable answer
    if status >= 500:
        return "server_errors"
    if case.expect == "200":
        return "ok" if status == 200 else "good_failed"
    if case.expect == "any" or 400 <= status < 500:
        return "ok"
    return "wrong_status"  # a 2xx/3xx for a request that cannot be valid


# ---- probes ----------------------------------------------------------------------------------------------
def fuzz_http(port: int, n: int, jpeg: bytes | None = None, seed: int = 0, workers: int = 4, good_every: int = 20,
              slow_every: int = 500, timeout: float = 30.0, max_body: int = 1 << 20) -> dict:
    """``n`` malformed requests (plus one good request every ``good_every``), ``workers`` at a time."""
    rng = random.Random(seed)
    openapi = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
    shape, max_batch = input_spec(openapi)
    jpeg = jpeg or png(shape[-1] if shape else 8, shape[-2] if len(shape) > 1 else 8, rng)
    cases: list[HttpCase] = []
    while len(cases) < n:
        batch = http_cases(shape, max_batch, jpeg, rng, max_body)
        rng.shuffle(batch)
        cases += batch
    cases = cases[:n]
    for i in range(slow_every - 1, len(cases), slow_every):
        cases[i] = rng.choice(slow_cases(rng))
    mixed: list[HttpCase] = []
    for i, case in enumerate(cases):
        mixed.append(case)
        if good_every and i % good_every == good_every - 1:
            mixed.append(rng.choice(good_cases(shape, jpeg, rng)))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda c: (c, exchange(port, c, timeout)), mixed))
    figures: Counter = Counter()
    statuses: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for case, (outcome, status, headers) in results:
        verdict = judge(case, outcome, status, headers)
        figures[verdict] += 1
        statuses[str(status) if status is not None else outcome] += 1
        if verdict != "ok" and len(examples.setdefault(verdict, [])) < 5:
            examples[verdict].append(f"{case.kind}: {outcome} {status}")
    good = sum(1 for c in mixed if c.expect == "200")
    return {"malformed_requests": n, "good_requests": good, "seconds": round(time.perf_counter() - t0, 1),
            **{k: figures.get(k, 0) for k in ("server_errors", "resets", "hangs", "unexpected_drops",
                                              "good_failed", "wrong_status")},
            "statuses": dict(sorted(statuses.items())), "failures": examples}


def fuzz_ws(port: int, n: int, jpeg: bytes | None = None, seed: int = 0, timeout: float = 30.0,
            max_body: int = 1 << 20) -> dict:
    """``n`` messages on /v1/stream (mostly bad): each must get its error (or its results), the socket stay
    open, or close with a proper code (1007 invalid UTF-8, 1009 too big); a new connection follows a close."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    rng = random.Random(seed)
    shape, max_batch = input_spec(httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json())
    jpeg = jpeg or png(shape[-1] if shape else 8, shape[-2] if len(shape) > 1 else 8, rng)
    messages: list[tuple[str, bytes | str, str]] = []
    while len(messages) < n:
        batch = ws_messages(shape, max_batch, jpeg, rng)
        if rng.random() < 0.05:
            batch.append(("ws-oversize", b"\x00" * (max_body + 1), "close"))
        rng.shuffle(batch)
        messages += batch
    figures: Counter = Counter()
    examples: dict[str, list[str]] = {}
    ws, connections = None, 0
    t0 = time.perf_counter()

    def fail(name: str, what: str) -> None:
        figures[name] += 1
        if len(examples.setdefault(name, [])) < 5:
            examples[name].append(what)

    for kind, message, expect in messages[:n]:
        if ws is None:
            ws = connect(f"ws://127.0.0.1:{port}/v1/stream", open_timeout=timeout, max_size=None)
            connections += 1
        try:
            ws.send(message, text=True) if kind == "ws-invalid-utf8" else ws.send(message)
            while True:
                answer = json.loads(ws.recv(timeout=timeout))
                if answer["type"] == "result":
                    continue
                if answer["type"] == "error" and answer["status"] >= 500 and not (
                        answer["status"] == 503 and answer.get("retry_after_s")):
                    fail("ws_server_errors", f"{kind}: {answer['status']} {answer['error'][:100]}")
                elif expect == "ok" and answer["type"] != "done":
                    fail("ws_good_failed", f"{kind}: {answer}")
                elif expect in ("error", "close") and answer["type"] != "error":
                    fail("ws_wrong_answer", f"{kind}: {answer['type']}")
                else:
                    figures["ok"] += 1
                break
        except TimeoutError:
            fail("ws_hangs", kind)
            ws.close()
            ws = None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            too_big = len(message.encode() if isinstance(message, str) else message) > max_body  # 1009, as the protocol says, whatever it held
            if (expect == "close" or (too_big and code == 1009)) and code in WS_PROPER_CLOSE:
                figures["proper_closes"] += 1
            else:
                fail("ws_drops", f"{kind}: closed with {code}")
            ws = None
    if ws is not None:
        ws.close()
    return {"ws_messages": n, "connections": connections, "seconds": round(time.perf_counter() - t0, 1),
            **{k: figures.get(k, 0) for k in ("ok", "proper_closes", "ws_server_errors", "ws_drops", "ws_hangs",
                                              "ws_good_failed", "ws_wrong_answer")},
            "failures": examples}


def _classify(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timeouts"
    return "resets"  # RemoteProtocolError (disconnected without an answer), ReadError, WriteError


def _client_loop(url: str, request: dict, stop: threading.Event, deadline: float, records: list,
                 backoff: float, until_refused: bool) -> None:
    """Send ``request`` in a loop on one keep-alive connection; append (start, end, outcome) per request."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                response = client.post("/v1/predict", **request)
                outcome = str(response.status_code)
                if response.status_code == 503:
                    outcome = "503_retry_after" if response.headers.get("retry-after") else "bad_503"
            except httpx.HTTPError as exc:
                outcome = _classify(exc)
            records.append((start, time.monotonic(), outcome))
            if outcome == "refused" and until_refused:
                return
            if outcome in ("503_retry_after", "refused"):
                time.sleep(backoff)


def load_probe(url: str, request: dict, clients: int = 32, seconds: float = 60.0, backoff: float = 0.05) -> dict:
    """``clients`` threads, each sending ``request`` (httpx ``post`` keyword arguments) for ``seconds``."""
    records: list = []
    stop = threading.Event()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_client_loop, args=(url, request, stop, deadline, records, backoff, False))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    stop.set()
    outcomes = Counter(r[2] for r in records)
    ok = sorted(r[1] - r[0] for r in records if r[2] == "200")
    return {"clients": clients, "seconds": seconds, "requests": len(records), "answered": outcomes.get("200", 0),
            "503_retry_after": outcomes.get("503_retry_after", 0), "bad_503": outcomes.get("bad_503", 0),
            "resets": outcomes.get("resets", 0), "timeouts": outcomes.get("timeouts", 0),
            "refused": outcomes.get("refused", 0),
            "other": sum(v for k, v in outcomes.items() if k not in ("200", "503_retry_after", "bad_503", "resets",
                                                                      "timeouts", "refused")),
            "p50_ms": round(1000 * ok[len(ok) // 2], 1) if ok else None,
            "p99_ms": round(1000 * ok[int(len(ok) * 0.99)], 1) if ok else None}


def sigterm_probe(server: ServeProcess, request: dict, clients: int = 16, before_s: float = 3.0,
                  limit_s: float = 60.0) -> dict:
    """Load ``server`` (already started) with ``clients``, SIGTERM it after ``before_s``, keep sending until
    each client is refused; count what every request got. ``in_flight_lost``: requests sent before the
    signal and still open at it that got no answer at all; ``cut_off``: any request that got no answer."""
    records: list = []
    stop = threading.Event()
    deadline = time.monotonic() + limit_s
    threads = [threading.Thread(target=_client_loop, args=(server.url, request, stop, deadline, records, 0.02, True))
               for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(limit_s)
        exited = round(time.monotonic() - signalled, 2)
    except subprocess.TimeoutExpired:
        exited = None
    stop.set()
    for t in threads:
        t.join(60)
    outcomes = Counter(r[2] for r in records)
    in_flight = [r for r in records if r[0] < signalled <= r[1]]
    return {"clients": clients, "requests": len(records), "exit_s": exited, "returncode": server.proc.returncode,
            "answered": outcomes.get("200", 0), "503_retry_after": outcomes.get("503_retry_after", 0),
            "refused": outcomes.get("refused", 0), "bad_503": outcomes.get("bad_503", 0),
            "cut_off": outcomes.get("resets", 0) + outcomes.get("timeouts", 0),
            "in_flight_at_signal": len(in_flight),
            "in_flight_answered": sum(1 for r in in_flight if r[2] == "200"),
            "in_flight_lost": sum(1 for r in in_flight if r[2] in ("resets", "timeouts")),
            "drained": "drained in" in server.log_text(), "traceback": "Traceback" in server.log_text()}


def metric_5xx(url: str) -> int:
    """Errors with a 5xx status other than 503 the server itself counted (``selfxit_errors_total``)."""
    total = 0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("selfxit_errors_total{") and 'status="5' in line and 'status="503"' not in line:
            total += int(float(line.split()[-1]))
    return total


def run_serve_reliability(bundle, model: str, *, weights=None, jpeg: bytes | None = None, malformed: int = 10_000,
                          ws_messages_n: int = 400, load_clients: int = 32, load_seconds: float = 60.0,
                          sigterm_clients: int = 16, max_queue_wait_ms: float = 1000.0, seed: int = 0) -> dict:
    """All probes against fresh servers; the dict of figures described in the module docstring."""
    max_body = 1 << 20
    limits = ["--max-batch", "16", "--max-body-bytes", str(max_body), "--read-timeout-s", "2", "--max-wait-ms", "5"]
    image = jpeg or png(32, 32, random.Random(seed))
    upload = {"files": [("files", ("a.jpg" if jpeg else "a.png", image, "image/jpeg" if jpeg else "image/png"))] * 16}
    out: dict = {}
    token = {"SELFXIT_ADMIN_TOKEN": f"reliability-{random.Random(seed).getrandbits(64):x}"}  # reload: 401
    with ServeProcess(bundle, model, limits, weights, env=token) as server:
        out["http_fuzz"] = fuzz_http(server.port, malformed, jpeg, seed, max_body=max_body)
        out["ws_fuzz"] = fuzz_ws(server.port, ws_messages_n, jpeg, seed, max_body=max_body)
        out["http_fuzz"]["server_5xx_metric"] = metric_5xx(server.url)
        out["http_fuzz"]["alive_after"] = httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        out["server_tracebacks"] = server.log_text().count("Traceback")
    with ServeProcess(bundle, model, [*limits, "--max-queue-wait-ms", str(max_queue_wait_ms)], weights) as server:
        out["load"] = load_probe(server.url, upload, load_clients, load_seconds)
    with ServeProcess(bundle, model, [*limits, "--drain-timeout-s", "10"], weights) as server:
        out["sigterm"] = sigterm_probe(server, upload, sigterm_clients)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--malformed", type=int, default=10_000)
    parser.add_argument("--ws-messages", type=int, default=400)
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(json.dumps(run_serve_reliability(args.bundle, args.model, malformed=args.malformed,
                                           ws_messages_n=args.ws_messages, load_clients=args.load_clients,
                                           load_seconds=args.load_seconds), indent=2))
