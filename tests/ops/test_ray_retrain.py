"""The nightly job on Ray (selfxit.ops.ray_jobs) with real processes: a local Ray on 127.0.0.1 with 2 CPUs, an
actor pool recording the medial dataset, one Ray task per head; compared with the single-process job."""
import functools
import json
import shutil
import time

import pytest
import torch

ray = pytest.importorskip("ray")  # the extra selfxit[ray]; .ci/run installs it

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from selfxit.ops.ray_cluster import connect
    started = connect(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(shared, tmp_path_factory):
    """A current bundle with heads at two layers, and a traffic log of 400 shared JPEGs."""
    from selfxit.api import EarlyExitModel
    from selfxit.core.candidates import Candidate
    from selfxit.core.exits import ExitRecord
    from selfxit.core.heads import DEFAULT_HEAD, build_head
    from selfxit.ops.traffic import TrafficLog, TrafficRecord
    from selfxit.zoo import load_backbone

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("ray-retrain")
    model, info = load_backbone("cifar_resnet20")
    cands = [Candidate("layer1", (16, 32, 32), 1), Candidate("layer2", (32, 16, 16), 1)]
    ee = EarlyExitModel(model, (3, 32, 32), 10, cands, backbone_flops=2)
    torch.manual_seed(0)
    ee.set_records([ExitRecord(c.name, build_head(DEFAULT_HEAD, c.shape, 10), 1.0, 0.9, spec=DEFAULT_HEAD,
                               shape=c.shape, head_flops=1) for c in cands])
    ee.tolerance = 0.05
    bundle = ee.save(work / "current")
    paths = sorted((shared / "data" / "cifar10-test").glob("*/00[0-3]?.jpg"))[:400]
    now = time.time() - 600
    with TrafficLog(work / "log") as log:
        for i, p in enumerate(paths):
            log.append(TrafficRecord(timestamp=now + i * 0.01, encoded=p.read_bytes(), content_type="image/jpeg",
                                     exit="final", source="collect"))
    return {"work": work, "model": model, "info": info, "bundle": bundle, "paths": paths}


def test_ray_recording_and_heads_equal_the_single_process_ones(local_ray, setup):
    """Same window: the medial dataset row for row (augmented copies included), the heads, temperatures, exits
    and thresholds of the Ray path equal those of the single-process path."""
    import selfxit
    from selfxit.ops.retrain import RetrainConfig, build_candidate
    from selfxit.ops.traffic import TrafficLog, record_input

    model, info, work = setup["model"], setup["info"], setup["work"]
    current = selfxit.load(setup["bundle"], model)
    records = sorted(TrafficLog(work / "log").read(), key=lambda r: r.timestamp)
    inputs = torch.stack([record_input(r, info) for r in records])[:200]  # two chunks
    built = {}
    for workers in (0, 2):
        config = RetrainConfig(tolerance=0.05, epochs=2, ray_workers=workers)
        timings: dict = {}
        built[workers] = build_candidate(model, current, inputs, work / f"medial-{workers}", 0.05, config, False,
                                         timings)
    one, dist = built[0], built[2]
    assert one.medial.meta.num_samples == dist.medial.meta.num_samples > 200  # with the augmented copies
    assert (one.medial.source == dist.medial.source).all() and (one.medial.split == dist.medial.split).all()
    for name in ("layer1", "layer2"):
        a, b = one.medial.activations(name), dist.medial.activations(name)
        assert (a == b).all(), name
    assert torch.equal(one.medial.teacher(), dist.medial.teacher())
    assert list(one.records) == list(dist.records)
    for name, record in one.records.items():
        other = dist.records[name]
        for key, tensor in record.head.state_dict().items():
            assert torch.allclose(tensor, other.head.state_dict()[key], atol=1e-6), (name, key)
        assert record.temperature == pytest.approx(other.temperature, abs=1e-6)
        assert (record.threshold is None) == (other.threshold is None)
        if record.threshold is not None:
            assert record.threshold == pytest.approx(other.threshold, abs=1e-6)
    assert one.thresholds.keys() == dist.thresholds.keys()


def test_retrain_on_ray_decides_like_the_single_process_job(local_ray, setup):
    """The whole job twice on the same window and store state: the same decision, checks and published bundle."""
    from selfxit.ops.retrain import RetrainConfig, retrain
    from selfxit.ops.versions import BundleStore

    work = setup["work"]
    results = {}
    for workers in (0, 2):
        store = BundleStore(work / f"store-{workers}")
        # a loose tolerance, so that heads trained on this small window make exits and the publish rule decides
        config = RetrainConfig(since=None, tolerance=0.3, epochs=3, min_records=200, ray_workers=workers)
        results[workers] = retrain(work / "log", store, setup["model"], setup["info"], config,
                                   current_bundle=setup["bundle"], progress=False)
        shutil.rmtree(work / f"store-{workers}" / ".work", ignore_errors=True)
    one, dist = results[0], results[2]
    print("single process:", one.reason, "| ray:", dist.reason)
    assert (one.records, one.train_records, one.holdout_records) == (dist.records, dist.train_records,
                                                                    dist.holdout_records)
    assert one.current == dist.current  # the same current bundle on the same held-back traffic
    assert one.candidate is not None and one.candidate == dist.candidate
    assert (one.published, one.reason) == (dist.published, dist.reason)
    if one.published:
        a, b = (json.loads((work / f"store-{k}" / "current" / "manifest.json").read_text()) for k in (0, 2))
        assert [(e["layer"], e["threshold"], e["temperature"]) for e in a["exits"]] == \
               [(e["layer"], e["threshold"], e["temperature"]) for e in b["exits"]]
    assert not (work / "store-2" / ".work").exists() or not any((work / "store-2" / ".work").iterdir())


def test_collect_on_ray_logs_every_image(local_ray, setup, tmp_path):
    """collect --ray: every image logged once, with the backbone's softmax, by two actors (two shards)."""
    from selfxit.cli.collect import _ray_encode
    from selfxit.ops import ray_jobs
    from selfxit.ops.traffic import TrafficLog

    paths = setup["paths"][:64]
    root = paths[0].parents[1]
    encode = functools.partial(_ray_encode, root=root, shifted=frozenset(), kind=None, seed=0, strength=None)
    counts = ray_jobs.collect_folder(setup["model"], setup["info"], [(p, i) for i, p in enumerate(paths)],
                                     str(tmp_path / "log"), encode, workers=2, batch_size=16)
    assert counts == {"records": 64, "corrupt": 0}
    records = list(TrafficLog(tmp_path / "log").read())
    assert sorted(r.meta["file"] for r in records) == sorted(str(p.relative_to(root)) for p in paths)
    with torch.inference_mode():
        from selfxit.ops.traffic import record_input
        r = records[0]
        expected = setup["model"](record_input(r, setup["info"])[None]).softmax(1)[0].numpy()
    assert r.backbone_probs == pytest.approx(expected, abs=1e-5) and r.prediction == int(expected.argmax())

