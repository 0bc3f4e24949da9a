"""The traffic log: record round trips, crashes (real kill -9), corruption, full disk, many writers, retention,
fsspec memory://, and ``selfxit collect`` on the shared images."""
import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfxit.ops import traffic
from selfxit.ops.traffic import TrafficLog, TrafficRecord, decode_frame, encode_record, record_input, record_inputs

torch.set_num_threads(1)
DAY = 86400.0

# Writer subprocesses import the real selfxit.ops.traffic package (``import selfxit`` is lazy, so this pulls in
# torch, numpy and fsspec, not the whole library); the assert catches a child that found another copy.
CHILD_PRELUDE = textwrap.dedent(f"""
    import json, sys, hashlib, numpy as np, torch
    torch.set_num_threads(1)
    import selfxit.ops.traffic as traffic
    assert traffic.__file__ == {traffic.__file__!r}, traffic.__file__
""")


def expected(writer, i, payload=256):
    """Record i of writer w: every field derived from (w, i), so any damage is visible."""
    digest = hashlib.sha256(f"{writer}-{i}".encode()).digest()
    return traffic.TrafficRecord(
        timestamp=1.7e9 + i * 1e-3 + writer * 1e-4, input=torch.full((3, 4, 4), float(i)),
        encoded=(digest * (payload // 32 + 1))[:payload], content_type="image/png",
        backbone_probs=np.linspace(0, 1, 10, dtype=np.float32) * writer, exit=f"layer{i % 3}", prediction=i % 10,
        bundle_version=f"v{writer}", shadow=bool(i % 2), source="serve", meta={"w": writer, "i": i})


# Writer subprocesses define the same expected() from its source: record i of writer w is the same in every process.
EXPECTED_SRC = "\n" + inspect.getsource(expected)


def child_script(body: str) -> str:
    return CHILD_PRELUDE + EXPECTED_SRC + textwrap.dedent(body)


def same(a: TrafficRecord, b: TrafficRecord, skip=()) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is None and y is None
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
        return x == y
    return all(eq(getattr(a, f), getattr(b, f)) for f in TrafficRecord.__dataclass_fields__ if f not in skip)


def check_intact(records, payload=256, skip=()):
    """Every record equals the one its meta names (but for the fields in skip); returns {(w, i)}."""
    records = list(records)
    seen = set()
    for r in records:
        w, i = r.meta["w"], r.meta["i"]
        assert same(r, expected(w, i, payload), skip), f"record {w}/{i} damaged"
        seen.add((w, i))
    assert len(seen) == len(records), "duplicated records"
    return seen


def run_child(body: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", child_script(body), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# ---- records ------------------------------------------------------------------------------------------
def test_round_trip_of_every_field(tmp_path):
    batch = torch.randn(4, 3, 32, 32)
    records = [
        TrafficRecord(100.0, input=batch[2], backbone_probs=np.full(10, 0.1, np.float32), exit="layer2.4",
                      prediction=7, bundle_version="abc123", shadow=True, source="serve"),  # a view into a batch
        TrafficRecord(101.5, encoded=b"\xff\xd8 not really a jpeg \x00", content_type="image/jpeg", source="collect",
                      meta={"file": "cat/0001.jpg", "nested": [1, "ü"]}),
        TrafficRecord(102.25),  # every optional field None
        TrafficRecord(103.0, input=torch.arange(6, dtype=torch.float16).reshape(2, 3), encoded=b""),
    ]
    with TrafficLog(tmp_path / "log", flush_interval_s=None) as log:
        for r in records:
            log.append(r)
    back = list(TrafficLog(tmp_path / "log").read())
    assert len(back) == 4 and all(same(a, b) for a, b in zip(records, back))
    assert back[0].input.shape == (3, 32, 32) and back[0].backbone_probs.dtype == np.float32
    assert back[2].input is None and back[2].encoded is None and back[2].meta is None and back[3].encoded == b""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.floats(-1e12, 1e12), encoded=st.none() | st.binary(max_size=300),
       probs=st.none() | st.lists(st.floats(0, 1, width=32), min_size=1, max_size=12),
       text=st.none() | st.text(max_size=20), prediction=st.none() | st.integers(-2**40, 2**40),
       shadow=st.booleans(), flip=st.integers(0, 10**6), xor=st.integers(1, 255))
def test_frames_round_trip_and_detect_any_flipped_byte(t, encoded, probs, text, prediction, shadow, flip, xor):
    record = TrafficRecord(t, input=torch.full((2, 2), t, dtype=torch.float64), encoded=encoded, content_type=text,
                           backbone_probs=None if probs is None else np.array(probs, np.float32), exit=text,
                           prediction=prediction, bundle_version=text, shadow=shadow,
                           meta=None if text is None else {"k": text})
    frame = encode_record(record)
    assert same(decode_frame(frame), record)
    damaged = bytearray(frame)
    damaged[flip % len(frame)] ^= xor
    with pytest.raises(ValueError):
        decode_frame(bytes(damaged))
    with pytest.raises(ValueError):
        decode_frame(frame[:-1])


@pytest.mark.parametrize("field,value,match", [
    ("timestamp", float("nan"), "timestamp"), ("source", "replay", "serve, collect"), ("prediction", 1.5, "prediction"),
    ("input", np.zeros(3), "input"), ("encoded", "text", "encoded"), ("meta", {"x": object()}, "meta"),
    ("backbone_probs", np.zeros((2, 2)), "backbone_probs")])
def test_bad_record_fields_are_named(field, value, match):
    record = TrafficRecord(1.0)
    setattr(record, field, value)
    with pytest.raises((TypeError, ValueError), match=match):
        encode_record(record)


def test_bad_arguments_are_named(tmp_path):
    for kwargs, match in (({"flush_records": 0}, "flush_records"), ({"shard_bytes": -1}, "shard_bytes"),
                          ({"flush_interval_s": float("nan")}, "flush_interval_s"),
                          ({"storage_options": "x"}, "storage_options")):
        with pytest.raises((TypeError, ValueError), match=match):
            TrafficLog(tmp_path, **kwargs)
    log = TrafficLog(tmp_path)
    with pytest.raises(ValueError, match="max_age_s and/or max_bytes"):
        log.prune()
    with pytest.raises(ValueError, match="max_bytes"):
        log.prune(max_bytes=-5)
    with pytest.raises(ValueError, match="since"):
        log.count(since="yesterday")
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append(TrafficRecord(1.0))


def test_record_input_decodes_like_image_folder_data(shared):
    from selfxit.zoo import ModelInfo
    from selfxit.zoo.data import ImageFolderData
    info = ModelInfo("cifar", (3, 32, 32), None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10)
    data = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=3, seed=0)
    records = [TrafficRecord(0.0, encoded=p.read_bytes(), content_type="image/jpeg") for p in data.paths]
    assert torch.equal(record_inputs(records, info), torch.stack([data[i][0] for i in range(3)]))
    tensor = TrafficRecord(0.0, input=torch.ones(3, 32, 32))
    assert record_input(tensor, info) is tensor.input
    with pytest.raises(ValueError, match="expects"):
        record_input(TrafficRecord(0.0, input=torch.ones(3, 8, 8)), info)
    with pytest.raises(ValueError, match="cannot decode"):
        record_input(TrafficRecord(0.0, encoded=b"garbage"), info)


# ---- durability -----------------------------------------------------------------------------------------
def test_flushes_itself_by_count_and_by_time(tmp_path):
    reader = TrafficLog(tmp_path)
    by_count = TrafficLog(tmp_path, flush_records=3, flush_interval_s=None)
    for i in range(4):
        by_count.append(expected(0, i))
    assert reader.count() == 3 and by_count.stats()["pending"] == 1  # the third append flushed
    by_time = TrafficLog(tmp_path, flush_records=100, flush_interval_s=0.2)
    by_time.append(expected(1, 0))
    deadline = time.monotonic() + 20
    # the background thread flushes the idle record; it counts it as acknowledged just after the write lands
    while (reader.count() < 4 or by_time.stats()["acknowledged"] < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.count() == 4 and by_time.stats()["acknowledged"] == 1
    by_count.close()
    by_time.close()
    assert check_intact(reader.read()) == {(0, i) for i in range(4)} | {(1, 0)}


@pytest.mark.slow
def test_kill_9_keeps_every_acknowledged_record(tmp_path):
    writer = """
        log = traffic.TrafficLog(sys.argv[1], flush_records=10**6, flush_interval_s=None)
        i = 0
        while True:
            for _ in range(5):
                log.append(expected(0, i, 20000)); i += 1
            print(log.flush(), flush=True)
    """
    for kill_after in (3, 11):
        location = tmp_path / f"log{kill_after}"
        proc = run_child(writer, location)
        acked = 0
        for _ in range(kill_after):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            acked = int(line)
        time.sleep(0.01 * kill_after)  # let it get into the middle of the next write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with warnings.catch_warnings(record=True):  # a torn last record may be reported; nothing may raise
            warnings.simplefilter("always")
            records = list(TrafficLog(location).read())
        seen = check_intact(records, 20000)
        assert {(0, i) for i in range(acked)} <= seen
        assert [r.timestamp for r in records] == sorted(r.timestamp for r in records)


def test_corrupt_and_truncated_shards_are_skipped_with_a_warning(tmp_path):
    shards = []
    for w in (1, 2, 3):
        with TrafficLog(tmp_path, flush_interval_s=None) as log:
            for i in range(10):
                log.append(expected(w, i))
        shards += [p for p in tmp_path.glob("*.tlog") if p not in shards]
    assert len(shards) == 3
    corrupt, truncated = shards[0], shards[1]
    data = bytearray(corrupt.read_bytes())
    middle = len(data) * 11 // 20  # inside record 5 of the 10 equal-sized ones
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    corrupt.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size * 2 // 3)
    with pytest.warns(UserWarning) as caught:
        records = list(TrafficLog(tmp_path).read())
    messages = " ".join(str(w.message) for w in caught)
    assert corrupt.name in messages and truncated.name in messages
    seen = check_intact(records)
    by_writer = {w: sorted(i for ww, i in seen if ww == w) for w in (1, 2, 3)}
    assert by_writer[1] == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # only the damaged record is lost; reading resumes after it
    assert by_writer[2] == list(range(len(by_writer[2]))) and 5 <= len(by_writer[2]) < 10  # the intact prefix
    assert by_writer[3] == list(range(10))


def test_a_write_in_progress_is_not_reported_as_torn(tmp_path):
    live = write(tmp_path, 6, [1.0, 2.0, 3.0], close=False)
    (shard,) = tmp_path.glob("*.tlog")
    with open(shard, "ab") as f:  # what a reader sees while the writer is half-way through a write
        f.write(encode_record(expected(6, 3))[:100])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(TrafficLog(tmp_path).read())) == 3
    live.close()


def test_full_disk_raises_clearly_and_keeps_earlier_shards(tmp_path):
    script = """
        import resource, signal
        location = sys.argv[1]
        with traffic.TrafficLog(location, flush_interval_s=None) as log:
            for i in range(5):
                log.append(expected(1, i, 20000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        log = traffic.TrafficLog(location, flush_records=2, flush_interval_s=None)
        try:
            for i in range(50):
                log.append(expected(2, i, 20000))
        except traffic.TrafficLogError as e:
            failed = {"message": str(e), "acked": log.stats()["acknowledged"], "pending": log.stats()["pending"]}
        else:
            sys.exit("no TrafficLogError")
        try:
            log.close()  # retries the pending records, in a fresh shard
        except traffic.TrafficLogError:
            pass
        print(json.dumps({**failed, "final": log.stats()["acknowledged"]}))
    """
    proc = run_child(script, tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert "File too large" in result["message"] and str(tmp_path) in result["message"]
    assert "intact" in result["message"] and result["pending"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failed write was truncated away: nothing torn to report
        records = list(TrafficLog(tmp_path).read())
    seen = check_intact(records, 20000)
    assert result["final"] >= result["acked"] >= 2
    assert seen == {(1, i) for i in range(5)} | {(2, i) for i in range(result["final"])}


@pytest.mark.slow
def test_several_writer_processes_at_once(tmp_path):
    script = """
        w = int(sys.argv[2])
        with traffic.TrafficLog(sys.argv[1], flush_records=7, flush_interval_s=0.05, shard_bytes=20_000) as log:
            for i in range(150):
                log.append(expected(w, i))
    """
    procs = [run_child(script, tmp_path, w) for w in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    log = TrafficLog(tmp_path)
    records = list(log.read())
    assert check_intact(records) == {(w, i) for w in range(3) for i in range(150)}
    assert [r.timestamp for r in records] == sorted(r.timestamp for r in records)
    stats = log.stats()
    assert stats["records"] == log.count() == 450 and stats["shards"] > 3
    assert {p.name.split("-")[2] for p in tmp_path.glob("*.tlog")} == {str(p.pid) for p in procs}
    t0 = 1.7e9 + 0.05
    assert log.count(since=t0, until=t0 + 0.05) == len(list(log.read(since=t0, until=t0 + 0.05))) == 150


# ---- retention ----------------------------------------------------------------------------------------
def write(location, writer, timestamps, close=True, **kw):
    log = TrafficLog(location, flush_interval_s=None, **kw)
    for i, t in enumerate(timestamps):
        r = expected(writer, i)
        r.timestamp = t
        log.append(r)
    log.flush()
    if close:
        log.close()
    return log


def test_retention_by_age_never_touches_a_live_shard(tmp_path):
    now = time.time()
    write(tmp_path, 1, [now - 10 * DAY + i for i in range(5)])
    write(tmp_path, 2, [now - 60 + i for i in range(5)])
    live = write(tmp_path, 3, [now - 20 * DAY + i for i in range(4)], close=False)
    janitor = TrafficLog(tmp_path)
    assert janitor.prune(max_age_s=DAY) == 5
    assert sorted({r.meta["w"] for r in janitor.read()}) == [2, 3]
    live.close()  # sealed: now it may go
    assert janitor.prune(max_age_s=DAY) == 4
    assert janitor.count() == 5 and janitor.stats()["shards"] == 1
    assert len(list(tmp_path.glob("*.idx"))) == 1


def test_an_index_left_half_written_by_a_dead_writer_is_removed_by_prune(tmp_path):
    from selfxit.core.atomic import temporary_name
    write(tmp_path, 1, [time.time() + i for i in range(3)])
    (index,) = tmp_path.glob("*.idx")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    mine = temporary_name(index)  # what the atomic writer names its temporary, with a pid that has exited
    orphan = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    orphan.write_bytes(b'{"records": 3')
    alive = temporary_name(index)  # a live writer's temporary (this process): left alone
    alive.write_bytes(b"{")
    log = TrafficLog(tmp_path)
    assert log.count() == 3 and log.prune(max_age_s=DAY) == 0
    assert not orphan.exists() and alive.exists()
    assert sorted(p.suffix for p in tmp_path.iterdir() if not p.name.startswith(".")) == [".idx", ".tlog"]


def test_retention_by_size_removes_oldest_shards_first(tmp_path):
    now = time.time()
    for w in range(4):
        write(tmp_path, w, [now - (4 - w) * 3600 + i for i in range(6)])
    log = TrafficLog(tmp_path)
    sizes = sorted(p.stat().st_size for p in tmp_path.glob("*.tlog"))
    assert log.prune(max_bytes=sizes[0] + sizes[1] + 10) == 12
    assert log.stats()["bytes"] <= sizes[0] + sizes[1] + 10
    assert sorted({r.meta["w"] for r in log.read()}) == [2, 3]
    assert log.prune(max_bytes=0) == 12 and log.stats()["records"] == 0 and not list(tmp_path.iterdir())


def test_dead_writer_shard_is_read_and_pruned(tmp_path):
    proc = run_child("""
        log = traffic.TrafficLog(sys.argv[1], flush_interval_s=None)
        for i in range(3):
            log.append(expected(4, i))
        log.flush()
        import os; os._exit(0)  # dies without sealing its shard
    """, tmp_path)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert not list(tmp_path.glob("*.idx"))
    log = TrafficLog(tmp_path)
    assert check_intact(log.read()) == {(4, i) for i in range(3)} and log.count() == 3
    assert log.prune(max_age_s=0) == 3 and not list(tmp_path.iterdir())


# ---- fsspec -------------------------------------------------------------------------------------------
def test_fsspec_memory_round_trip():
    location = f"memory://selfxit-test-{uuid.uuid4().hex}/log"
    log = TrafficLog(location, flush_records=4, flush_interval_s=None)
    try:
        now = time.time()
        for i in range(10):
            r = expected(5, i)
            r.timestamp = now - 10 * DAY if i < 4 else now + i
            log.append(r)
        log.close()
        assert log.stats()["shards"] == 3  # one immutable object per flush
        reader = TrafficLog(location)
        assert check_intact(reader.read(), skip=["timestamp"]) == {(5, i) for i in range(10)}
        assert reader.count(since=now) == 6
        assert reader.prune(max_age_s=DAY) == 4 and reader.count() == 6
        assert reader.prune(max_bytes=0) == 6 and reader.stats()["shards"] == 0
    finally:
        if log.fs.exists(log.root):
            log.fs.rm(log.root, recursive=True)


# ---- selfxit collect ------------------------------------------------------------------------------------
def test_collect_logs_shifted_images_with_backbone_probs(shared, tmp_path, capsys):
    from PIL import Image

    from selfxit.cli import main
    from selfxit.ops.shift import apply_shift
    from selfxit.zoo import load_backbone

    images = sorted((shared / "data" / "cifar10-test").rglob("*.jpg"))[::500][:20]
    data = tmp_path / "images"
    data.mkdir()
    for k, p in enumerate(images):
        shutil.copy(p, data / f"{k:02d}_{p.name}")
    (data / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff this is not an image")
    log_dir = tmp_path / "log"
    with pytest.warns(UserWarning, match="zz_broken.jpg"):
        rc = main(["collect", "--model", "cifar_resnet56", "--data", str(data), "--log", str(log_dir),
                   "--transform", "blur", "--batch-size", "8"])
    assert rc == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "collected 20 records" in summary and "1 corrupt image(s) skipped" in summary
    records = list(TrafficLog(log_dir).read())
    assert len(records) == 20
    logged_order = [r.meta["file"] for r in records]  # read() gives arrival order
    assert sorted(logged_order) != logged_order  # arrival is shuffled, not file (= class) order
    assert all(r.source == "collect" and r.exit == "final" and r.content_type == "image/png" for r in records)
    model, info = load_backbone("cifar_resnet56")
    with torch.inference_mode():
        probs = torch.softmax(model(record_inputs(records, info)), 1).numpy()
    assert np.allclose(np.stack([r.backbone_probs for r in records]), probs, atol=1e-5)
    assert [r.prediction for r in records] == probs.argmax(1).tolist()
    for r in records[:3]:  # the shift is in the bytes
        with Image.open(data / r.meta["file"]) as original:
            shifted = apply_shift(original, "blur", r.meta["shift_seed"])
        with Image.open(io.BytesIO(r.encoded)) as logged:
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(shifted))
