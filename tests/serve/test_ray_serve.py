"""Ray Serve deployment (selfxit.serve.ray_serve) with real processes: a local Ray on 127.0.0.1 with 2 CPUs,
Ray Serve's proxy and two replicas, real shared JPEGs. The probes are benchmarks/ray_serve.py's, at small sizes."""
import json
import socket
import sys
import time

import benchmark_scripts
import pytest

ray = pytest.importorskip("ray")  # the extra selfxit[ray]; .ci/run installs it



def _bench():
    return benchmark_scripts.load("ray_serve", "ray_serve_bench")


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def cluster(shared, tmp_path_factory, bench):
    """A store with one published version, served by two replicas; everything is stopped at the end."""
    import torch
    from ray import serve

    from selfxit.ops.ray_cluster import connect
    from selfxit.ops.versions import BundleStore
    from selfxit.serve.config import ServeConfig
    from selfxit.serve.ray_config import RayServeConfig
    from selfxit.serve.ray_serve import ray_app
    from selfxit.serve.ray_state import kill_board

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("ray-serve")
    first, second = bench.quick_bundles(work)
    store = BundleStore(work / "store")
    store.publish(first, reason="first")
    port = bench.free_port()
    started = connect(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(store.root, "cifar_resnet20", config=ServeConfig(shadow_fraction=0.5, max_batch=8),
                          ray_config=RayServeConfig(replicas=2, replica_cpus=0.5, poll_s=0.5)),
                  name="selfxit", route_prefix="/")
        files = [(p.name, p.read_bytes()) for p in sorted((shared / "data" / "cifar10-test").glob("*/000[0-3].jpg"))]
        yield {"base": f"http://127.0.0.1:{port}", "store": store, "first": first, "second": second, "files": files,
               "work": work}
    finally:
        kill_board("selfxit")
        serve.shutdown()
        if started:
            ray.shutdown()


def _post(base, files, **kw):
    import httpx
    return httpx.post(f"{base}/v1/predict", files=[("files", (n, d, "image/jpeg")) for n, d in files], timeout=60, **kw)


@pytest.mark.slow
def test_two_replicas_answer_like_the_bundle_in_process(cluster):
    """Both replicas answer the shared JPEGs exactly as the published bundle run in this process."""
    import torch

    import selfxit
    from selfxit.serve import requests as rq
    from selfxit.zoo import load_backbone
    from selfxit.zoo.data import image_transform

    model, info = load_backbone("cifar_resnet20")
    ee = selfxit.load(cluster["store"].current_path, model)
    files = cluster["files"][:8]
    x = rq.decode_images(files, image_transform(info), 4096 * 4096)
    with torch.inference_mode():
        out = ee(x)
    names = list(ee.thresholds)
    expected = [(int(out.predictions[i]), "final" if out.exit[i] < 0 else names[out.exit[i]]) for i in range(len(x))]
    replicas = set()
    for _ in range(30):
        r = _post(cluster["base"], files)
        assert r.status_code == 200, r.text
        body = r.json()
        replicas.add(body["replica"])
        assert [(it["class"], it["exit"]) for it in body["items"]] == expected
        for it, p in zip(body["items"], out.probabilities.max(1).values.tolist()):
            assert it["probability"] == pytest.approx(p, abs=1e-5)
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, f"only replica(s) {replicas} answered in 30 requests"


@pytest.mark.slow
def test_request_errors_are_the_same_4xx(cluster):
    """The one request-parsing module: the same statuses and messages as selfxit serve."""
    import httpx
    base = cluster["base"]
    r = httpx.post(f"{base}/v1/predict", json={"inputs": [[1.0, 2.0]]}, timeout=30)
    assert r.status_code == 400 and "input shape must be" in r.json()["error"]
    r = httpx.post(f"{base}/v1/predict", content=b"x", headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "unsupported content type" in r.json()["error"]
    r = _post(base, cluster["files"][:1] * 9)  # max_batch 8
    assert r.status_code == 413 and "max_batch" in r.json()["error"]
    r = httpx.post(f"{base}/v1/predict", content=b"{" * 100, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "nested" in r.json()["error"]
    assert "X-Request-ID" in r.headers or "x-request-id" in r.headers


@pytest.mark.slow
def test_stream_websocket(cluster):
    """/v1/stream through Ray Serve's WebSocket support: a result per item, then done; a bad message an error."""
    from websockets.sync.client import connect
    url = cluster["base"].replace("http://", "ws://") + "/v1/stream"
    with connect(url, open_timeout=30) as ws:
        ws.send(cluster["files"][0][1])
        result, done = json.loads(ws.recv(timeout=30)), json.loads(ws.recv(timeout=30))
        assert result["type"] == "result" and result["index"] == 0 and done["type"] == "done" and done["items"] == 1
        ws.send(json.dumps({"inputs": [[1.0]], "id": "x"}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["status"] == 400 and error["id"] == "x"


@pytest.mark.slow
def test_monitor_and_metrics_cover_both_replicas(cluster):
    import httpx
    for _ in range(6):
        assert _post(cluster["base"], cluster["files"][:4]).status_code == 200
    time.sleep(2)  # one report period
    monitor = httpx.get(f"{cluster['base']}/v1/monitor", timeout=30).json()
    assert monitor["replicas"] == 2 and monitor["items"] >= 24 and monitor["shadow_samples"] > 0
    assert 0 <= monitor["live_agreement"] <= 1
    text = httpx.get(f"{cluster['base']}/metrics", timeout=30).text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("selfxit_requests_total{")}
    assert len(replicas) == 2 and "selfxit_live_agreement " in text and "selfxit_replicas 2.0" in text


@pytest.mark.slow
def test_publish_under_load_fails_no_request(cluster, bench):
    """A publish during 8 clients x 8 s: zero failed requests, both replicas on the new version afterwards."""
    out = bench.publish_probe(cluster["base"], cluster["store"], cluster["second"], cluster["files"], 8, 8, 2)
    print("publish under load:", out)
    assert out["failed"] == 0, out
    assert out["sent"] > 20
    assert set(out["versions_after"].values()) == {out["published"]} and len(out["versions_after"]) == 2, out


@pytest.mark.slow
def test_user_config_pins_a_version_under_load(cluster, bench):
    """Redeploying with a version pinned in user_config (then following current again) under 8 clients: Ray Serve
    rolls the replicas (serve.run gives no code version, so Serve starts new ones and drains the old), each loads
    the pinned version in reconfigure, and no request fails."""
    from ray import serve

    from selfxit.serve.config import ServeConfig
    from selfxit.serve.ray_config import RayServeConfig
    from selfxit.serve.ray_serve import ray_app

    def deploy(version):
        serve.run(ray_app(cluster["store"].root, "cifar_resnet20", config=ServeConfig(shadow_fraction=0.5, max_batch=8),
                          ray_config=RayServeConfig(replicas=2, replica_cpus=0.5, poll_s=0.5, version=version)),
                  name="selfxit", route_prefix="/")

    current = cluster["store"].current()
    with bench.Load(f"{cluster['base']}/v1/predict", cluster["files"], 8) as load:
        time.sleep(2)
        deploy("v000001")
        pinned = bench.wait_versions(cluster["base"], "v000001", 2)
        deploy(None)
        following = bench.wait_versions(cluster["base"], current, 2)
    out = load.summary()
    print("pin and unpin under load:", out)
    assert set(pinned["versions"].values()) == {"v000001"} and pinned["bundle"]["pinned"] == "v000001", pinned
    assert set(following["versions"].values()) == {current} and following["bundle"]["pinned"] is None, following
    assert out["failed"] == 0 and out["versions"].get("v000001", 0) > 0, out


@pytest.mark.slow
def test_bundle_that_fails_to_load_is_refused_and_old_one_serves(cluster):
    """A version for another backbone publishes (the store only checks it is a bundle) but every replica refuses
    it: /healthz says degraded, the old version keeps answering."""
    import httpx
    import torch

    from selfxit.core.bundle import MANIFEST
    store = cluster["store"]
    before = httpx.get(f"{cluster['base']}/healthz", timeout=30).json()["versions"]
    wrong = cluster["work"] / "wrong"
    wrong.mkdir()
    for f in cluster["second"].iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((wrong / MANIFEST).read_text())
    manifest["backbone_fingerprint"] = "0" * 64
    (wrong / MANIFEST).write_text(json.dumps(manifest))
    store.publish(wrong, reason="test: a bundle no replica can load")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = httpx.get(f"{cluster['base']}/healthz", timeout=30).json()
        if all(r["status"] == "degraded" for r in state["replicas"].values() if not r["stale"]):
            break
        time.sleep(0.5)
    assert all(r["status"] == "degraded" for r in state["replicas"].values() if not r["stale"]), state
    assert state["versions"] == before and "backbone" in state["last_reload"]["error"]
    torch.set_num_threads(1)
    assert _post(cluster["base"], cluster["files"][:2]).status_code == 200
    store.rollback(reason="test: back to the good version")


@pytest.mark.slow
def test_unreadable_store_reports_unhealthy_and_serving_goes_on(cluster):
    import httpx
    store = cluster["store"]
    hidden = store.root.with_name("store-hidden")
    store.root.rename(hidden)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = httpx.get(f"{cluster['base']}/healthz", timeout=30).json()
            if state["status"] == "unhealthy":
                break
            time.sleep(0.5)
        assert state["status"] == "unhealthy" and state["store"]["error"], state
        assert _post(cluster["base"], cluster["files"][:2]).status_code == 200
    finally:
        hidden.rename(store.root)


@pytest.mark.slow
def test_replica_killed_under_load(cluster, bench):
    """SIGKILL one replica process under 8 clients: at most the requests in flight are lost, and the endpoint
    answers again within 10 s (Ray Serve routes to the other replica and starts a replacement)."""
    out = bench.kill_probe(cluster["base"], cluster["files"], 8, 10)
    print("replica killed under load:", out)
    assert out["answering_again_after_s"] is not None and out["answering_again_after_s"] <= 10, out
    assert out["failed"] <= max(out["in_flight_at_kill"], 8), out


def test_unreachable_address_fails_within_bounded_time():
    from selfxit.ops.ray_cluster import check_reachable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="cannot be reached"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_reachable("nonsense", 1)


def test_missing_ray_names_the_extra(monkeypatch):
    from selfxit.extras import MissingExtraError, require_extra
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'selfxit\[ray\]'"):
        require_extra("ray", "selfxit serve --ray")


def test_ray_config_refuses_bad_settings():
    from selfxit.serve.ray_config import RayServeConfig
    with pytest.raises(ValueError, match="--min-replicas and --max-replicas"):
        RayServeConfig(min_replicas=1).validate()
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        RayServeConfig(max_batch_size=32, max_ongoing_requests=8).validate()
    options = RayServeConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=3).deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 3}
    assert "num_replicas" not in options and options["max_ongoing_requests"] >= 8
    from selfxit.serve.ray_serve import EarlyExitReplica
    EarlyExitReplica.options(name="selfxit", **options)  # Ray Serve validates the options here


def test_unreadable_bundle_is_refused_before_deploying(tmp_path):
    from selfxit.serve.ray_serve import ray_app
    with pytest.raises(ValueError, match="cannot read a bundle"):
        ray_app(tmp_path / "nothing", "cifar_resnet20")
