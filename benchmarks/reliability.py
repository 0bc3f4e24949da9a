"""Reliability under crashes and bad input, with real processes; prints one table of figures.

* **Writer kills**: traffic-log writer processes are killed with SIGKILL at random moments (mid-flush, mid-seal)
  while a bystander writer keeps writing to the same log. After each kill the log is reopened: every record a
  ``flush()`` acknowledged must be there, intact and once, and no temporary file of a dead writer may be left
  (index temporaries, empty shards); the bystander's files are never touched.
* **Retrain kills** (:mod:`reliability_retrain`): real ``selfxit retrain`` runs on a small ResNet-20 setup killed
  with SIGKILL at random moments and at each step of the publish; ``current`` must load after every kill and
  nothing may be left once the next run has run. **SIGTERM** at training and during the publish: the run exits
  143 and leaves nothing, by itself.
* **Crafted records**: CRC-valid frames whose headers lie, between intact records; the reader must skip each
  with a warning and return every intact record.
* **Serving** probes (fuzzed requests, load, SIGTERM to the server) come from ``benchmarks/reliability_serve.py``
  when it is present (HOOK: see :func:`serving_rows`).

    .venv/bin/python benchmarks/reliability.py [--writer-kills 100] [--retrain-kills 30] [--crafted 2000]
                                               [--skip-retrain] [--json OUT]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import random
import struct
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("NNI_FRAMEWORK", "none")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from selfxit.core.atomic import TMP_MARK, stale_temporaries  # noqa: E402
from selfxit.ops.traffic import TrafficLog, TrafficRecord, encode_record  # noqa: E402
from selfxit.ops.traffic.layout import SHARD_SUFFIX, dead_writer  # noqa: E402

BYSTANDER = 0


def make_record(writer: int, i: int, payload: int = 1024) -> TrafficRecord:
    """Record i of writer w: every field derived from (w, i), so damage or a mix-up is visible."""
    digest = hashlib.sha256(f"{writer}-{i}".encode()).digest()
    return TrafficRecord(timestamp=1.7e9 + i * 1e-3 + writer * 1e-6, input=torch.full((3, 4, 4), float(i)),
                         encoded=(digest * (payload // 32 + 1))[:payload], content_type="image/png",
                         backbone_probs=np.full(10, writer / 1000, np.float32), exit="final", prediction=i % 10,
                         meta={"w": writer, "i": i})


def _intact(r: TrafficRecord, payload: int) -> bool:
    want = make_record(r.meta["w"], r.meta["i"], payload)
    return (r.encoded == want.encoded and torch.equal(r.input, want.input) and r.timestamp == want.timestamp
            and np.array_equal(r.backbone_probs, want.backbone_probs))


def _writer(location: str, writer: int, fd: int, payload: int, shard_bytes: int, batch: int, pause: float) -> None:
    """A forked writer process: append ``batch`` records, flush, report the acknowledged count; forever."""
    log = TrafficLog(location, flush_records=10**6, flush_interval_s=None, shard_bytes=shard_bytes)
    i = 0
    while True:
        for _ in range(batch):
            log.append(make_record(writer, i, payload))
            i += 1
        os.write(fd, struct.pack("<I", log.flush()))
        if pause:
            time.sleep(pause)


def _fork_writer(location: Path, writer: int, payload: int, shard_bytes: int, batch: int, pause: float = 0.0):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            _writer(str(location), writer, w, payload, shard_bytes, batch, pause)
        except BaseException:  # noqa: BLE001 - a forked child must not unwind into the parent's code
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _read_acks(fd: int, blocking_count: int = 0) -> list[int]:
    """Read ``blocking_count`` acks (blocking), or, with 0, every ack up to EOF (the writer is dead)."""
    acks, buf = [], b""
    while blocking_count == 0 or len(acks) < blocking_count:
        chunk = os.read(fd, 4 * max(1, blocking_count - len(acks)) if blocking_count else 65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 4:
            acks.append(struct.unpack("<I", buf[:4])[0])
            buf = buf[4:]
    return acks


def _stale(location: Path) -> tuple[int, int]:
    """(temporaries of dead writers, empty shards of dead writers) now in the log folder."""
    temps = len(stale_temporaries(location))
    empty = sum(1 for p in location.iterdir() if p.name.endswith(SHARD_SUFFIX) and dead_writer(p.name)
                and p.stat().st_size == 0)
    return temps, empty


def writer_kills(root: Path, kills: int, seed: int = 0, payload: int = 1024, shard_bytes: int = 12_000,
                 batch: int = 4) -> dict:
    """SIGKILL ``kills`` writers at random moments (a bystander writes all along); returns the figures."""
    rng = random.Random(seed)
    location = root / "writer-kills"
    location.mkdir(parents=True, exist_ok=True)
    bystander, bystander_fd = _fork_writer(location, BYSTANDER, payload, shard_bytes, 1, pause=0.02)
    os.set_blocking(bystander_fd, False)
    bystander_acks = [0]
    acked: dict[int, int] = {}
    f = {"kills": kills, "acknowledged": 0, "lost": 0, "damaged": 0, "duplicated": 0, "stale_before_open": 0,
         "idx_temporaries_before_open": 0, "stale_after_open": 0, "removed_at_open": 0, "torn_reported": 0}
    start = time.perf_counter()
    try:
        for k in range(1, kills + 1):
            pid, fd = _fork_writer(location, k, payload, shard_bytes, batch)
            got = _read_acks(fd, rng.randint(1, 6))
            time.sleep(rng.uniform(0, 0.004))  # into the middle of the next append / write / fsync / seal
            os.kill(pid, 9)
            os.waitpid(pid, 0)  # reaped: its pid no longer runs
            got += _read_acks(fd)
            os.close(fd)
            acked[k] = max(got, default=0)
            try:
                bystander_acks += _read_acks(bystander_fd, 10**9)
            except BlockingIOError:
                pass
            temps, empty = _stale(location)
            f["stale_before_open"] += temps + empty
            f["idx_temporaries_before_open"] += sum(".idx" + TMP_MARK in p.name for p in stale_temporaries(location))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                log = TrafficLog(location)  # the next open
                records = list(log.read())
            f["torn_reported"] += len(caught)
            f["removed_at_open"] += len(log.removed)
            f["stale_after_open"] += sum(_stale(location))
            seen: dict[tuple[int, int], int] = {}
            for r in records:
                key = (r.meta["w"], r.meta["i"])
                seen[key] = seen.get(key, 0) + 1
                if key[0] == k or k == kills:
                    f["damaged"] += not _intact(r, payload)
            f["duplicated"] += sum(n - 1 for n in seen.values())
            f["lost"] += sum((w, i) not in seen for w, n in acked.items() for i in range(n))
    finally:
        os.kill(bystander, 9)
        os.waitpid(bystander, 0)
    os.set_blocking(bystander_fd, True)
    bystander_acks += _read_acks(bystander_fd)
    os.close(bystander_fd)
    records = list(TrafficLog(location).read())
    seen_all = {(r.meta["w"], r.meta["i"]) for r in records}
    f["bystander_acknowledged"] = max(bystander_acks)
    f["bystander_lost"] = sum((BYSTANDER, i) not in seen_all for i in range(max(bystander_acks)))
    f["acknowledged"] = sum(acked.values())
    f["left_after_last_open"] = sum(_stale(location))
    f["seconds"] = round(time.perf_counter() - start, 1)
    return f


def _frame(header: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(header, zlib.crc32(struct.pack("<II", len(header), len(body)))))
    return struct.pack("<4sIII", b"SXTR", len(header), len(body), crc) + header + body


def crafted_records(root: Path, count: int, seed: int = 0) -> dict:
    """``count`` CRC-valid frames with lying headers, each between two intact records; all read in one pass."""
    rng = random.Random(seed)
    raw = encode_record(make_record(9, 0, 64))
    n_head = struct.unpack("<4sIII", raw[:16])[1]
    base, body = json.loads(raw[16:16 + n_head]), raw[16 + n_head:]
    junk = [None, True, -1, 2**40, 1.5, float("nan"), "x", [], {}, [3, 64, 64], {"dtype": "qint8"}, "float32"]
    parts, crafted = [], 0
    for j in range(count):
        head = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            move = rng.choice(["drop", "set", "tensor"])
            if move == "drop":
                head.pop(rng.choice(sorted(head)), None)
            elif move == "set":
                head[rng.choice(sorted(base))] = rng.choice(junk)
            elif isinstance(head.get("tensors"), dict):
                spec = head["tensors"].setdefault(rng.choice(["input", "backbone_probs"]), {})
                if isinstance(spec, dict):
                    spec[rng.choice(["dtype", "shape", "nbytes"])] = rng.choice(junk)
        parts.append(encode_record(make_record(9, 2 * j + 1, 64)))
        parts.append(_frame(json.dumps(head).encode(), body[:rng.randint(0, len(body))]))
        crafted += 1
    location = root / "crafted"
    location.mkdir(parents=True, exist_ok=True)
    (location / f"20240101T000000-crafted-1-abcd0123-00001{SHARD_SUFFIX}").write_bytes(b"".join(parts))
    errors, returned = 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            returned = sum(1 for r in TrafficLog(location).read() if r.meta and r.meta.get("i", 0) % 2 == 1)
        except Exception:  # noqa: BLE001 - the figure is whether the reader stops
            errors = 1
    return {"crafted": crafted, "intact_returned": returned, "intact": count, "reader_errors": errors,
            "warnings": len(caught)}


# figures of reliability_serve.run_serve_reliability that must be 0, per section (its module docstring)
SERVE_ZEROS = {"http_fuzz": ("server_errors", "resets", "hangs", "unexpected_drops", "good_failed"),
               "ws_fuzz": ("ws_server_errors", "ws_drops", "ws_hangs"), "load": ("resets", "bad_503", "other"),
               "sigterm": ("cut_off", "in_flight_lost")}
SERVE_RUNS = {"http_fuzz": "malformed_requests", "ws_fuzz": "ws_messages", "load": "requests", "sigterm": "requests"}


def serving_rows(args, bundle: Path | None, figures: dict) -> list[tuple]:
    """The serving half's probes (benchmarks/reliability_serve.py: fuzzed HTTP and WebSocket requests, load,
    SIGTERM), run against ``bundle``, as table rows."""
    path = HERE / "reliability_serve.py"
    if not path.exists():
        return [("serving probes", "-", "benchmarks/reliability_serve.py not present", "-", "n/a")]
    if bundle is None:
        return [("serving probes", "-", "skipped (they need a bundle: ../shared and no --skip-retrain)", "-", "n/a")]
    spec = importlib.util.spec_from_file_location("reliability_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = figures["serve"] = module.run_serve_reliability(
        bundle, "cifar_resnet20", malformed=args.malformed, ws_messages_n=args.ws_messages,
        load_clients=args.load_clients, load_seconds=args.load_seconds, seed=args.seed)
    rows = []
    for section, keys in SERVE_ZEROS.items():
        got = out.get(section) or {}
        present = [k for k in keys if k in got]
        if present:
            total = sum(int(got[k] or 0) for k in present)
            rows.append((f"serve {section}: {' / '.join(present)}", got.get(SERVE_RUNS[section], "-"),
                         " / ".join(str(got[k]) for k in present), "0", total == 0))
    if "server_tracebacks" in out:
        rows.append(("serve: tracebacks in the server log", 1, out["server_tracebacks"], "0",
                     out["server_tracebacks"] == 0))
    return rows


def table(rows: list[tuple]) -> str:
    head = ("probe", "runs", "figure", "target", "ok")
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), line, *(fmt.format(*r) for r in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writer-kills", type=int, default=100)
    p.add_argument("--retrain-kills", type=int, default=30)
    p.add_argument("--crafted", type=int, default=2000)
    p.add_argument("--skip-retrain", action="store_true", help="no retrain probes (they need ../shared)")
    p.add_argument("--skip-serve", action="store_true", help="no serving probes")
    p.add_argument("--malformed", type=int, default=2000, help="serving: malformed HTTP requests")
    p.add_argument("--ws-messages", type=int, default=200, help="serving: bad WebSocket messages")
    p.add_argument("--load-clients", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    figures, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="selfxit-reliability-") as tmp:
        root = Path(tmp)
        w = figures["writer_kills"] = writer_kills(root, args.writer_kills, args.seed)
        rows += [("writer SIGKILL: acknowledged records lost", w["kills"], f"{w['lost']} of {w['acknowledged']}", "0",
                  w["lost"] == 0),
                 ("writer SIGKILL: records damaged / duplicated", w["kills"], f"{w['damaged']} / {w['duplicated']}",
                  "0 / 0", w["damaged"] == w["duplicated"] == 0),
                 ("writer SIGKILL: dead writers' temporaries after next open", w["kills"],
                  f"{w['stale_after_open']} (seen before open: {w['stale_before_open']}, of which index temporaries "
                  f"{w['idx_temporaries_before_open']})", "0", w["stale_after_open"] == 0),
                 ("live bystander writer: acknowledged records lost", 1,
                  f"{w['bystander_lost']} of {w['bystander_acknowledged']}", "0", w["bystander_lost"] == 0)]
        c = figures["crafted"] = crafted_records(root, args.crafted, args.seed)
        rows.append(("crafted CRC-valid records: reader errors / intact returned", c["crafted"],
                     f"{c['reader_errors']} / {c['intact_returned']} of {c['intact']} ({c['warnings']} warning(s))",
                     f"0 / {c['intact']}", c["reader_errors"] == 0 and c["intact_returned"] == c["intact"]))
        bundle = None
        if not args.skip_retrain:
            import reliability_retrain as rr

            from selfxit.settings import shared_dir
            setup = rr.prepare(root / "retrain", shared_dir())
            bundle = setup["original"]
            rows += _retrain_rows(setup, args, figures)
        if not args.skip_serve:
            rows += serving_rows(args, bundle, figures)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0 if all(r[4] in (True, "n/a") for r in rows) else 1


def _retrain_rows(setup: dict, args, figures: dict) -> list[tuple]:
    import reliability_retrain as rr

    if args.retrain_kills <= 0:
        return []
    k = figures["retrain_kills"] = rr.retrain_kills(setup, args.retrain_kills, args.seed)
    s = figures["retrain_sigterm"] = rr.retrain_sigterm(setup)
    plans = ", ".join(f"{n} {p}" for p, n in sorted(k["by_plan"].items()))
    return [("retrain SIGKILL: current loadable after the kill", k["kills"], f"{k['loadable']} of {k['kills']} ({plans})",
             "all", k["loadable"] == k["kills"]),
            ("retrain SIGKILL: dead runs' litter left after a later run", k["kills"],
             f"{k['stale_after_next_run']} (seen right after kills: {k['litter_seen_after_kills']})", "0",
             k["stale_after_next_run"] == 0),
            ("retrain: litter after the next full run", 1,
             f"{k['final_litter']} (one uninterrupted run: {k['run_s']} s)", "0",
             k["final_litter"] == 0 and k["final_run_exit"] == 0),
            ("retrain SIGTERM (fit, copy, renamed): exit 143 / left behind", s["sigterms"],
             f"{s['exit_143']} / {s['left_behind']}", f"{s['sigterms']} / 0",
             s["exit_143"] == s["sigterms"] and s["left_behind"] == 0)]


if __name__ == "__main__":
    sys.exit(main())
