"""Published bundle versions: atomic publish, current pointer, rollback, retention, refusal of non-bundles."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from selfxit.core.bundle import MANIFEST, BundleError, load_bundle, save_bundle
from selfxit.ops.versions import BundleStore


def _bundle(path, tag: float):
    heads = {"layer1": {"0.weight": torch.full((2, 2), tag)}}
    return save_bundle(path, {"tolerance": 0.01, "meta": {"tag": tag}}, heads)


def _tag(path):
    manifest, heads = load_bundle(path)
    assert float(heads["layer1"]["0.weight"][0, 0]) == manifest["meta"]["tag"]
    return manifest["meta"]["tag"]


def test_publish_makes_each_new_version_current_and_stamps_its_name(tmp_path):
    store = BundleStore(tmp_path / "bundles")
    assert store.current() is None and store.versions() == []
    assert store.publish(_bundle(tmp_path / "a", 1.0), reason="first") == "v000001"
    assert store.publish(_bundle(tmp_path / "b", 2.0), reason="second") == "v000002"
    assert store.current() == "v000002"
    assert _tag(store.current_path) == 2.0
    assert json.loads((store.current_path / MANIFEST).read_text())["meta"]["version"] == "v000002"
    assert [e["event"] for e in store.history()] == ["publish", "publish"]
    assert store.history()[1]["reason"] == "second"


def test_rollback_goes_back_one_version_at_a_time_and_stops_at_the_oldest(tmp_path):
    store = BundleStore(tmp_path / "bundles")
    for tag in (1.0, 2.0, 3.0):
        store.publish(_bundle(tmp_path / f"b{tag}", tag))
    assert store.rollback() == "v000002" and _tag(store.current_path) == 2.0
    assert store.rollback() == "v000001" and _tag(store.current_path) == 1.0
    with pytest.raises(BundleError, match="oldest version"):
        store.rollback()
    assert store.publish(_bundle(tmp_path / "b4", 4.0)) == "v000004"  # numbering never reuses a name
    assert store.history()[-2]["event"] == "rollback"


def test_rollback_with_nothing_published_says_so(tmp_path):
    with pytest.raises(BundleError, match="nothing is published"):
        BundleStore(tmp_path / "empty").rollback()


def test_only_the_last_versions_are_kept(tmp_path):
    store = BundleStore(tmp_path / "bundles", keep=3)
    for tag in range(6):
        store.publish(_bundle(tmp_path / f"b{tag}", float(tag)))
    assert [v.name for v in store.versions()] == ["v000004", "v000005", "v000006"]
    with pytest.raises(ValueError, match="keep must be >= 2"):
        BundleStore(tmp_path / "x", keep=1)


def test_a_folder_that_is_not_a_bundle_is_refused_and_nothing_changes(tmp_path):
    store = BundleStore(tmp_path / "bundles")
    store.publish(_bundle(tmp_path / "good", 1.0))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        store.publish(tmp_path / "junk")
    assert store.current() == "v000001" and [v.name for v in store.versions()] == ["v000001"]


def test_a_publisher_killed_mid_copy_leaves_the_current_version_intact(tmp_path):
    """kill -9 a real process while it copies a large version in: current still resolves to the old bundle."""
    store = BundleStore(tmp_path / "bundles")
    store.publish(_bundle(tmp_path / "small", 1.0))
    big = save_bundle(tmp_path / "big", {"tolerance": 0.01, "meta": {"tag": 2.0}},
                      {"layer1": {"0.weight": torch.full((2, 2), 2.0), "pad": torch.zeros(40_000_000)}})
    script = textwrap.dedent(f"""
        import shutil, sys
        from selfxit.ops.versions import BundleStore
        real = shutil.copy2
        def slow(src, dst, **kw):
            print("copying", flush=True)
            sys.stdin.readline()  # the parent kills us here, mid-copy
            return real(src, dst, **kw)
        shutil.copy2 = slow
        BundleStore({str(tmp_path / 'bundles')!r}).publish({str(big)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "copying"
    proc.kill()
    proc.wait(10)
    assert store.current() == "v000001" and _tag(store.current_path) == 1.0
    assert [v.name for v in store.versions()] == ["v000001"]  # the staging folder is hidden, not a version
    staging = [p.name for p in (store.root / "versions").iterdir() if p.name.startswith(".")]
    assert staging and all(".tmp-" in name and str(proc.pid) in name for name in staging)  # the dead writer's
    assert store.publish(_bundle(tmp_path / "next", 3.0)) == "v000002"  # the lock was released by the kill
    assert os.readlink(store.current_path).endswith("v000002")
    assert not [p for p in (store.root / "versions").iterdir() if p.name.startswith(".")]  # cleaned by the publish
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", "current", "history.jsonl", "versions"]
