"""Crash litter: what dead writers, publishers and retrain runs leave is removed by the next open or run, and
nothing a live process (or another host) owns is ever touched. Real processes, killed with SIGKILL."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from selfxit.core import atomic
from selfxit.core.bundle import load_bundle, save_bundle
from selfxit.ops.signals import Interrupted, raise_on_signals
from selfxit.ops.traffic import TrafficLog, TrafficRecord
from selfxit.ops.versions import BundleStore


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def as_dead(path, pid=None):
    """``path`` (a name from atomic.temporary_name / work_dir of this process) as if a dead process made it."""
    return path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{pid or dead_pid()}-"))


# ---- core.atomic ---------------------------------------------------------------------------------------
def test_stale_temporaries_are_only_those_of_dead_processes_on_this_host(tmp_path):
    final = tmp_path / "thing.json"
    mine = atomic.temporary_name(final)
    assert atomic.owner_tag() in mine.name and mine.name.startswith(".thing.json.tmp-")
    dead = as_dead(mine)
    other_host = mine.with_name(mine.name.replace(atomic.owner_tag(), "elsewhere-1"))
    foreign = tmp_path / ".thing.json.tmp-not-our-naming-at-all"
    for p in (mine, dead, other_host, foreign):
        p.write_text("x")
    (dead_dir := as_dead(atomic.temporary_name(tmp_path / "folder"))).mkdir()
    (dead_dir / "inner").write_text("y")
    assert atomic.stale_temporaries(tmp_path) == sorted([dead, dead_dir])
    assert sorted(atomic.remove_stale_temporaries(tmp_path)) == sorted([dead, dead_dir])
    assert mine.exists() and other_host.exists() and foreign.exists() and not dead.exists() and not dead_dir.exists()


def test_a_folder_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    """staged_dir renames the old folder aside, then the new one in; dying between the two loses neither."""
    target = tmp_path / "bundle"
    aside = as_dead(atomic.temporary_name(target, tag=atomic.OLD_TAG))
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    with pytest.warns(UserWarning, match="restored the previous version"):
        assert atomic.remove_stale_temporaries(tmp_path) == []
    assert (target / "manifest.json").read_text() == "{}"
    again = as_dead(atomic.temporary_name(target, tag=atomic.OLD_TAG))  # the name is taken now: a leftover copy
    again.mkdir()
    assert atomic.remove_stale_temporaries(tmp_path) == [again] and target.is_dir()


def test_work_dirs_of_dead_processes_are_removed(tmp_path):
    live = atomic.work_dir(tmp_path)
    assert live.parent == tmp_path and live.name.startswith(atomic.WORK_PREFIX + atomic.owner_tag() + "-")
    dead = as_dead(live)
    (dead / "medial").mkdir(parents=True)
    (dead / "medial" / "shard.bin").write_bytes(b"0" * 1000)
    keep = tmp_path / "not-ours"
    keep.mkdir()
    lookalike = tmp_path / dead.name[len(atomic.WORK_PREFIX):]  # <host>-<pid>-<x> without our prefix: not ours
    lookalike.mkdir()
    assert atomic.remove_stale_work_dirs(tmp_path) == [dead]
    assert live.is_dir() and keep.is_dir() and lookalike.is_dir() and not dead.exists()
    assert atomic.remove_stale_work_dirs(tmp_path / "missing") == []


def test_signals_raise_inside_the_block_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        with raise_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert caught.value.code == 128 + signal.SIGTERM and "SIGTERM" in str(caught.value)
    assert signal.getsignal(signal.SIGTERM) is before


# ---- traffic log -----------------------------------------------------------------------------------------
def record(i: int) -> TrafficRecord:
    return TrafficRecord(timestamp=1.7e9 + i, input=torch.full((3, 2, 2), float(i)), meta={"i": i})


def test_opening_a_log_removes_what_dead_writers_left_and_nothing_else(tmp_path):
    with TrafficLog(tmp_path, flush_interval_s=None) as log:
        for i in range(3):
            log.append(record(i))
    (shard,) = tmp_path.glob("*.tlog")
    index = shard.with_suffix(".idx")
    live_tmp = atomic.temporary_name(index)  # this process: a live writer sealing right now
    dead_tmp = as_dead(atomic.temporary_name(index))
    live_tmp.write_text("{")
    dead_tmp.write_text('{"records": 3')
    pid = dead_pid()
    stem = shard.name.split("-")
    empty_dead = tmp_path / "-".join([stem[0], stem[1], str(pid), "abcd1234", "00001.tlog"])
    empty_other_host = tmp_path / "-".join([stem[0], "otherhost", str(pid), "abcd1234", "00001.tlog"])
    empty_dead.touch()
    empty_other_host.touch()
    orphan_index = tmp_path / ("20200101T000000-" + stem[1] + f"-{pid}-abcd1234-00001.idx")
    orphan_index.write_text('{"records": 0, "oldest": null, "newest": null, "sorted": true}')
    reopened = TrafficLog(tmp_path)
    assert sorted(reopened.removed) == sorted(map(str, [dead_tmp, empty_dead, orphan_index]))
    assert live_tmp.exists() and empty_other_host.exists() and shard.exists() and index.exists()
    assert [r.meta["i"] for r in reopened.read()] == [0, 1, 2]


def test_a_writer_killed_while_sealing_leaves_an_index_temporary_that_the_next_open_removes(tmp_path):
    """kill -9 a real writer between writing its shard's index temporary and renaming it into place."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        from selfxit.core import atomic
        from selfxit.ops.traffic import TrafficLog, TrafficRecord
        real = os.replace
        def replace(src, dst):
            if str(dst).endswith(".idx"):
                print("sealing", flush=True)
                sys.stdin.readline()  # the parent kills us here
            return real(src, dst)
        atomic.os.replace = replace
        log = TrafficLog({str(tmp_path)!r}, flush_interval_s=None, shard_bytes=600)
        for i in range(6):
            log.append(TrafficRecord(timestamp=1.7e9 + i, input=torch.full((3, 2, 2), float(i)), meta={{"i": i}}))
            print("acked", log.flush(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    acked = 0
    for line in proc.stdout:
        if line.startswith("acked"):
            acked = int(line.split()[1])
        if line.strip() == "sealing":
            break
    proc.kill()
    proc.wait(30)
    left = [p for p in tmp_path.iterdir() if ".idx.tmp-" in p.name]
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name
    log = TrafficLog(tmp_path)
    assert log.removed == [str(left[0])] and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert acked >= 1 and [r.meta["i"] for r in log.read()] == list(range(acked))


# ---- bundle store ----------------------------------------------------------------------------------------
def bundle(path, tag: float):
    return save_bundle(path, {"tolerance": 0.01, "meta": {"tag": tag}}, {"layer1": {"0.weight": torch.full((2, 2), tag)}})


def tag(path) -> float:
    manifest, heads = load_bundle(path)
    assert float(heads["layer1"]["0.weight"][0, 0]) == manifest["meta"]["tag"]
    return manifest["meta"]["tag"]


PUBLISHER = """
import os, shutil, sys
from selfxit.ops import versions
stage = sys.argv[3]
def pause(name):
    if name == stage:
        print(name, flush=True)
        sys.stdin.readline()  # the parent kills us here
real_copy, real_point, real_log = shutil.copy2, versions.BundleStore._point_to, versions.BundleStore._log
def copy(src, dst, **kw):
    pause("copy")
    return real_copy(src, dst, **kw)
def point(self, name):
    pause("renamed")
    real_point(self, name)
    pause("pointed")
def log(self, event):
    real_log(self, event)
    pause("logged")
versions.shutil.copy2 = copy
versions.BundleStore._point_to, versions.BundleStore._log = point, log
versions.BundleStore(sys.argv[1]).publish(sys.argv[2], reason="killed")
"""


@pytest.mark.parametrize("stage, current", [("copy", "v000001"), ("renamed", "v000001"), ("pointed", "v000002"),
                                            ("logged", "v000002")])
def test_a_publisher_killed_at_any_step_leaves_a_loadable_current_and_the_next_clean_settles_it(tmp_path, stage,
                                                                                               current):
    store = BundleStore(tmp_path / "bundles")
    store.publish(bundle(tmp_path / "one", 1.0), reason="first")
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(store.root), str(bundle(tmp_path / "two", 2.0)),
                             stage], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == stage
    proc.kill()
    proc.wait(30)
    assert store.current() == current and tag(store.current_path) == {"v000001": 1.0, "v000002": 2.0}[current]
    removed = store.clean()
    assert any(".publishing-v000002" in p.name for p in removed)  # the dead publisher's marker
    assert store.current() == current and [v.name for v in store.versions()] == sorted({"v000001", current})
    hidden = [p.name for d in (store.root, store.root / "versions") for p in d.iterdir() if ".tmp-" in p.name]
    assert hidden == []
    if current == "v000002":  # made current before it died: the publish is logged exactly once
        assert [e["version"] for e in store.history() if e["event"] == "publish"] == ["v000001", "v000002"]
    assert store.publish(bundle(tmp_path / "three", 3.0)) == ("v000002" if current == "v000001" else "v000003")


def test_a_publish_stopped_by_an_exception_after_the_rename_removes_its_version(tmp_path, monkeypatch):
    store = BundleStore(tmp_path / "bundles")
    store.publish(bundle(tmp_path / "one", 1.0))

    def fail(self, name):
        raise Interrupted(signal.SIGTERM)
    monkeypatch.setattr(BundleStore, "_point_to", fail)
    with pytest.raises(Interrupted):
        store.publish(bundle(tmp_path / "two", 2.0))
    assert store.current() == "v000001" and [v.name for v in store.versions()] == ["v000001"]
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "current", "history.jsonl", "versions"]


def test_a_torn_history_line_is_skipped_with_a_warning(tmp_path):
    store = BundleStore(tmp_path / "bundles")
    store.publish(bundle(tmp_path / "one", 1.0), reason="first")
    with open(store.root / "history.jsonl", "a") as fh:
        fh.write('{"event": "publish", "vers')  # a crash mid-append
    with pytest.warns(UserWarning, match="line 2"):
        assert [e["reason"] for e in store.history()] == ["first"]


def test_old_versions_are_renamed_out_of_the_listing_before_they_are_deleted(tmp_path, monkeypatch):
    store = BundleStore(tmp_path / "bundles", keep=2)
    for i in range(2):
        store.publish(bundle(tmp_path / f"b{i}", float(i)))
    seen = []
    real = shutil.rmtree

    def rmtree(path, *a, **k):  # a kill during the deletion would leave this name: hidden, not a version
        seen.append(os.path.basename(path))
        return real(path, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    store.publish(bundle(tmp_path / "b2", 2.0))
    assert any(name.startswith(".v000001.tmp-") for name in seen) and "v000001" not in seen
    assert [v.name for v in store.versions()] == ["v000002", "v000003"]


def test_retrain_result_reports_removed_items_as_json(tmp_path):
    from selfxit.ops.retrain import RetrainResult, summary
    result = RetrainResult(False, "v000001", "nothing", removed=["/b/.work/h-1-aa", "/b/.v2.tmp-h-1-bb"])
    assert json.loads(json.dumps(result.to_dict()))["removed"] == result.removed
    assert "removed 2 item(s) left by runs that died" in summary(result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BundleStore(tmp_path / "none").clean() == []  # no store yet: nothing created, nothing to do
    assert not (tmp_path / "none").exists()
