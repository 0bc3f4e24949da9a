"""The server as a real subprocess on loopback: real JPEGs over HTTP and WebSocket, errors, batching, hot reload."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from websockets.sync.client import connect

import selfxit
from selfxit.api import EarlyExitModel
from selfxit.core.candidates import Candidate
from selfxit.core.exits import ExitRecord
from selfxit.core.heads import DEFAULT_HEAD, build_head
from selfxit.fit.distill import DistillConfig
from selfxit.zoo import load_backbone
from selfxit.zoo.data import image_transform

MAX_BATCH, MAX_BODY = 20, 1_000_000
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture(scope="session")
def built(shared, slow_setup, tmp_path_factory):
    """A fitted ResNet-20 bundle whose thresholds are set so that both exits and the backbone answer."""
    from selfxit.zoo.data import ImageFolderData
    model, info = load_backbone("cifar_resnet20")
    traffic = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=300, seed=1)
    ee = selfxit.wrap(model, torch.zeros(1, 3, 32, 32), max_candidates=4)
    ee.collect(torch.utils.data.DataLoader(traffic, batch_size=100), tmp_path_factory.mktemp("medial"),
               augment_copies=1, progress=False)
    ee.fit(0.05, distill=DistillConfig(epochs=3), method="joint", progress=False)
    root = tmp_path_factory.mktemp("bundles")
    fitted = selfxit.load(ee.save(root / "fitted"), model)
    if not fitted.thresholds:  # nothing passed the tolerance: serve the kept heads anyway
        fitted.thresholds = {name: 1.1 for name in fitted.heads}
    sample = torch.stack([traffic[i][0] for i in range(64)])
    confidence = fitted(sample, shrink=False).exit_confidence  # [exits, 64]
    ee.thresholds = {name: float(np.quantile(confidence[k].numpy(), 0.75 if k == 0 else 0.5))
                     for k, name in enumerate(fitted.thresholds)}
    path = ee.save(root / "served")
    files = [shared / "data" / "cifar10-test" / c / f"{i:04d}.jpg" for c in CLASSES for i in (0, 1)]
    return {"ee": ee, "model": model, "info": info, "path": path, "files": files}


def _reference(ee, info, files):
    """(class, exit name) per file, from the bundle run in this process on the same batch."""
    transform = image_transform(info)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    out = ee(x)
    names = list(ee.thresholds)
    return x, [(int(c), "final" if e < 0 else names[e]) for c, e in zip(out.predictions, out.exit)]


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """`python -m selfxit serve` on a free loopback port, serving a copy of the bundle (killed at teardown)."""
    serving = tmp_path_factory.mktemp("serving") / "bundle"
    shutil.copytree(built["path"], serving)
    yield from _serve(serving, tmp_path_factory.mktemp("log") / "server.log")


def _serve(serving, log_path, extra=(), preexec_fn=None):
    """Run the server on ``serving`` until the generator is closed; yields what the tests need."""
    port = _free_port()
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "selfxit", "serve", "--bundle", str(serving), "--model", "cifar_resnet20",
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(MAX_BATCH), "--max-wait-ms", "20",
           "--max-body-bytes", str(MAX_BODY), "--timeout-s", "30", "--reload-poll-s", "0.2",
           "--log-level", "warning", "--threads", "1", *extra]  # one thread: on busy shared cores two can stall a batch
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NNI_FRAMEWORK": "none"},
                            preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            def up():
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_until(up, 90, "the server to answer /healthz")
            yield {"url": url, "port": port, "bundle": serving, "client": client, "log": log, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _multipart(files):
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files]


def _items(response):
    assert response.status_code == 200, response.text
    return [(item["class"], item["exit"]) for item in response.json()["items"]]


def test_health_and_metrics(server):
    health = server["client"].get("/healthz").json()
    assert health["status"] == "ok" and health["bundle"]["generation"] == 1 and health["bundle"]["exits"]
    metrics = server["client"].get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for family in ("selfxit_requests_total", "selfxit_errors_total", "selfxit_exit_items_total",
                   "selfxit_item_latency_seconds", "selfxit_reloads_total"):
        assert f"# TYPE {family} " in metrics.text


METRIC_FAMILIES = {  # name -> type, as exported before metrics went through prometheus-client
    "selfxit_requests": "counter", "selfxit_errors": "counter", "selfxit_exit_items": "counter",
    "selfxit_item_latency_seconds": "histogram", "selfxit_microbatches": "counter",
    "selfxit_microbatch_requests": "counter", "selfxit_microbatch_items": "counter", "selfxit_reloads": "counter",
    "selfxit_queue_items": "gauge", "selfxit_bundle_generation": "gauge", "selfxit_exit_hit_rate": "gauge",
    "selfxit_exit_live_agreement": "gauge", "selfxit_traffic_logged_items": "gauge",
    "selfxit_traffic_log_enabled": "gauge",
}
LIVE_FAMILIES = {"selfxit_live_agreement": "gauge", "selfxit_shadow_samples": "gauge"}  # once a shadow run happened


def test_metrics_are_valid_prometheus_text_with_the_existing_names(server, built):
    from prometheus_client.parser import text_string_to_metric_families

    assert _items(server["client"].post("/v1/predict", files=_multipart(built["files"][:4])))
    # hit rates come from the monitor, which sees a batch after its answers went out
    _wait_until(lambda: server["client"].get("/v1/monitor").json()["items"] >= 4, 30, "the monitor")
    response = server["client"].get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    types = {name: f.type for name, f in families.items()}
    assert set(types) - set(LIVE_FAMILIES) == set(METRIC_FAMILIES) and "_created" not in response.text
    assert {name: types[name] for name in METRIC_FAMILIES} == METRIC_FAMILIES

    def samples(family, suffix=""):
        return {tuple(sorted(s.labels.items())): s.value for s in families[family].samples
                if s.name == family + suffix}

    assert samples("selfxit_requests", "_total")[(("endpoint", "predict"),)] >= 1
    assert samples("selfxit_reloads", "_total").keys() == {(("result", "ok"),), (("result", "refused"),)}
    exits = samples("selfxit_exit_items", "_total")
    assert sum(exits.values()) == samples("selfxit_item_latency_seconds", "_count")[()] >= 4
    assert {dict(k)["exit"] for k in exits} <= set(built["ee"].thresholds) | {"final"}
    assert samples("selfxit_bundle_generation")[()] >= 1
    assert sum(samples("selfxit_exit_hit_rate").values()) == pytest.approx(1)
    assert samples("selfxit_microbatch_items", "_total")[()] >= samples("selfxit_microbatches", "_total")[()] >= 1


def test_each_app_has_its_own_metrics_registry():
    """Two apps in one process (tests, two bundles) count separately and never clash over names."""
    from selfxit.serve.metrics import ServeMetrics

    first, second = ServeMetrics(), ServeMetrics()
    first.request("predict")
    first.error("predict", 413)
    first.add_gauges(lambda: {"selfxit_queue_items": ("Items waiting for the worker.", 3)})
    assert 'selfxit_requests_total{endpoint="predict"} 1.0' in first.render().decode()
    assert 'selfxit_errors_total{endpoint="predict",status="413"} 1.0' in first.render().decode()
    assert "selfxit_queue_items 3.0" in first.render().decode()
    text = second.render().decode()
    assert "# TYPE selfxit_requests_total counter" in text and 'endpoint="predict"' not in text
    assert "selfxit_queue_items" not in text


def _png(width, height, fmt="PNG") -> bytes:
    import io
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("data, max_pixels, status, words", [
    (_png(8, 8, "GIF"), 10_000, 415, "unsupported image format GIF"),
    (_png(200, 100), 10_000, 413, "200x100 pixels exceeds max_image_pixels 10000"),
    (b"\x89PNG\r\n\x1a\n broken", 10_000, 400, "cannot decode"),
])
def test_image_decoding_errors_map_to_http_statuses(data, max_pixels, status, words):
    """Uploads go through selfxit.zoo.images.open_rgb; its errors become 415 (format), 413 (pixels), 400 (corrupt)."""
    from selfxit.serve.requests import ApiError, decode_images

    def transform(img):
        return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32)).permute(2, 0, 1)

    with pytest.raises(ApiError) as caught:
        decode_images([("files[0] (x)", data)], transform, max_pixels)
    assert caught.value.status == status and words in caught.value.message and "files[0] (x)" in caught.value.message
    assert decode_images([("ok", _png(40, 30))], transform, 10_000).shape == (1, 3, 32, 32)


def test_multipart_jpegs_match_the_bundle_in_process(server, built):
    _, expected = _reference(built["ee"], built["info"], built["files"])
    response = server["client"].post("/v1/predict", files=_multipart(built["files"]))
    assert _items(response) == expected
    assert {e for _, e in expected} - {"final"} and "final" in {e for _, e in expected}  # both kinds occur
    item = response.json()["items"][0]
    assert 0 < item["probability"] <= 1 and item["latency_ms"] > 0 and item["index"] == 0


def test_json_tensor_matches_the_bundle_in_process(server, built):
    x, expected = _reference(built["ee"], built["info"], built["files"][:8])
    response = server["client"].post("/v1/predict", json={"inputs": x.tolist()})
    assert _items(response) == expected


def _as_png(path) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def test_raw_jpeg_and_png_bodies_match_the_bundle_in_process(server, built, tmp_path):
    """One image as the whole body (Content-Type image/jpeg or image/png) gets the in-process answer."""
    for path in built["files"][::3]:
        png = tmp_path / f"{path.stem}.png"
        png.write_bytes(_as_png(path))
        for file, ctype in ((path, "image/jpeg"), (png, "image/png")):
            response = server["client"].post("/v1/predict", content=file.read_bytes(),
                                              headers={"content-type": ctype})
            assert _items(response) == _reference(built["ee"], built["info"], [file])[1], (path, ctype)
    # a parameter on the media type is ignored, as for the other body types
    response = server["client"].post("/v1/predict", content=built["files"][0].read_bytes(),
                                      headers={"content-type": "image/jpeg; q=1"})
    assert _items(response) == _reference(built["ee"], built["info"], built["files"][:1])[1]


@pytest.mark.parametrize("case", ["empty body", "PNG sent as image/jpeg", "JPEG sent as image/png",
                                  "garbage as image/jpeg", "truncated JPEG", "GIF as image/png", "too many pixels",
                                  "body too large", "another image type"])
def test_bad_raw_image_bodies_get_a_4xx_naming_the_problem(server, built, case):
    jpeg = built["files"][0].read_bytes()
    body, ctype, status, words = {
        "empty body": (b"", "image/jpeg", 400, "empty image/jpeg body"),
        "PNG sent as image/jpeg": (_png(8, 8), "image/jpeg", 400, "bytes are a PNG image but Content-Type says image/jpeg"),
        "JPEG sent as image/png": (jpeg, "image/png", 400, "bytes are a JPEG image but Content-Type says image/png"),
        "garbage as image/jpeg": (b"\xff\xd8garbage" * 50, "image/jpeg", 400, "body (image/jpeg): cannot decode"),
        "truncated JPEG": (jpeg[:200], "image/jpeg", 400, "cannot decode"),
        "GIF as image/png": (_png(8, 8, "GIF"), "image/png", 415, "unsupported image format GIF"),
        "too many pixels": (_png(5000, 4000), "image/png", 413, "5000x4000 pixels exceeds max_image_pixels"),
        "body too large": (b"\xff\xd8\xff" + b"0" * MAX_BODY, "image/jpeg", 413, "max_body_bytes"),
        "another image type": (_png(8, 8, "GIF"), "image/gif", 415, "image/jpeg or image/png"),
    }[case]
    response = server["client"].post("/v1/predict", content=body, headers={"content-type": ctype})
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower(), response.json()
    assert len(_items(server["client"].post("/v1/predict", content=jpeg,
                                            headers={"content-type": "image/jpeg"}))) == 1


def test_raw_image_parsing_without_a_server():
    from selfxit.serve.requests import ApiError, check_body_type, raw_image
    png = _png(4, 4)
    assert raw_image(png, "image/png") == [("body (image/png)", png)]
    assert check_body_type("image/jpg") == "image/jpg"
    with pytest.raises(ApiError, match="empty image/png body"):
        raw_image(b"", "image/png")
    with pytest.raises(ApiError, match="send Content-Type image/png") as caught:
        raw_image(png, "image/jpg")
    assert caught.value.status == 400


def test_websocket_streams_each_item_as_its_exit_fires(server, built):
    files = built["files"][:12]
    x, expected = _reference(built["ee"], built["info"], files)
    order = {name: k for k, name in enumerate(built["ee"].thresholds)} | {"final": len(built["ee"].thresholds)}
    with connect(f"ws://127.0.0.1:{server['port']}/v1/stream", open_timeout=10) as ws:
        ws.send(json.dumps({"inputs": x.tolist(), "id": "b0"}))
        results = []
        for _ in range(len(files) + 1):
            message = json.loads(ws.recv(timeout=30))
            if message["type"] != "result":
                break
            results.append(message)
        assert message == {**message, "type": "done", "batch": 0, "id": "b0", "items": len(files)}
        assert sorted(r["index"] for r in results) == list(range(len(files)))
        assert {r["index"]: (r["class"], r["exit"]) for r in results} == dict(enumerate(expected))
        positions = [order[r["exit"]] for r in results]
        assert positions == sorted(positions)  # early exits are sent before the backbone's answers

        ws.send(b"\xff\xd8 this is not a jpeg")  # a bad binary message: an error, the connection stays usable
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["status"] == 400 and "decode" in error["error"]
        ws.send(json.dumps({"inputs": [[[0.0]]]}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and "shape" in error["error"]

        ws.send(files[3].read_bytes())  # one JPEG as a binary message
        result, done = json.loads(ws.recv(timeout=30)), json.loads(ws.recv(timeout=30))
        assert (result["class"], result["exit"]) == _reference(built["ee"], built["info"], [files[3]])[1][0]
        assert done["type"] == "done" and done["batch"] == 3 and done["items"] == 1


def _expected_sets(ee, x, alpha):
    """Each sample's conformal set (sorted class indices) from the bundle run in this process."""
    sets = ee(x, prediction_sets=alpha).prediction_sets
    return [torch.nonzero(row).flatten().tolist() for row in sets]


def test_prediction_sets_over_http_and_websocket_match_the_bundle_in_process(server, built):
    files = built["files"]
    x, expected = _reference(built["ee"], built["info"], files)
    sets = _expected_sets(built["ee"], x, 0.1)
    response = server["client"].post("/v1/predict", params={"sets": "0.1"}, files=_multipart(files))
    items = response.json()["items"]
    assert _items(response) == expected and [item["set"] for item in items] == sets
    for item in items:  # the backbone's own answers come with the singleton set of that answer
        if item["exit"] == "final":
            assert item["set"] == [item["class"]]
    assert any(len(item["set"]) != 1 for item in items if item["exit"] != "final")  # sets do their job

    json_items = server["client"].post("/v1/predict", json={"inputs": x[:6].tolist(), "sets": 0.05}).json()["items"]
    assert [item["set"] for item in json_items] == _expected_sets(built["ee"], x[:6], 0.05)
    assert "set" not in server["client"].post("/v1/predict", files=_multipart(files[:2])).json()["items"][0]

    with connect(f"ws://127.0.0.1:{server['port']}/v1/stream?sets=0.1", open_timeout=10) as ws:
        ws.send(json.dumps({"inputs": x[:6].tolist()}))
        results = [json.loads(ws.recv(timeout=30)) for _ in range(7)]
        assert results[-1]["type"] == "done"
        assert {r["index"]: r["set"] for r in results[:-1]} == dict(enumerate(sets[:6]))
        ws.send(json.dumps({"inputs": x[:2].tolist(), "sets": 0.01}))  # a message may ask for its own alpha
        results = [json.loads(ws.recv(timeout=30)) for _ in range(3)]
        assert {r["index"]: r["set"] for r in results[:-1]} == dict(enumerate(_expected_sets(built["ee"], x[:2], 0.01)))


@pytest.mark.parametrize("sets, words", [("2", "(0, 1)"), ("abc", "(0, 1)"), ("0.2", "calibrated for alpha")])
def test_bad_prediction_set_alpha_gets_a_400_naming_it_and_the_server_keeps_serving(server, built, sets, words):
    response = server["client"].post("/v1/predict", params={"sets": sets}, files=_multipart(built["files"][:2]))
    assert response.status_code == 400 and words in response.json()["error"], response.text
    bad_json = server["client"].post("/v1/predict", json={"inputs": torch.zeros(1, 3, 32, 32).tolist(), "sets": True})
    assert bad_json.status_code == 400 and "'sets'" in bad_json.json()["error"]
    with connect(f"ws://127.0.0.1:{server['port']}/v1/stream?sets={sets}", open_timeout=10) as ws:
        if words == "(0, 1)":  # a malformed alpha on the connection: one error message, then the socket closes
            error = json.loads(ws.recv(timeout=30))
            assert error["type"] == "error" and error["status"] == 400 and words in error["error"]
        else:  # a well-formed but uncalibrated alpha: each batch gets the error, the connection stays usable
            ws.send(built["files"][0].read_bytes())
            error = json.loads(ws.recv(timeout=30))
            assert error["type"] == "error" and words in error["error"]
    assert len(_items(server["client"].post("/v1/predict", files=_multipart(built["files"][:2])))) == 2


def _bad_requests(built):
    jpeg = built["files"][0].read_bytes()
    good_shape = torch.zeros(2, 3, 32, 32).tolist()
    return {
        "garbage bytes as a JPEG": (dict(files=[("files", ("x.jpg", b"\xff\xd8garbage" * 50, "image/jpeg"))]),
                                    400, "decode"),
        "truncated JPEG": (dict(files=[("files", ("t.jpg", jpeg[:200], "image/jpeg"))]), 400, "decode"),
        "wrong tensor shape": (dict(json={"inputs": torch.zeros(2, 3, 16, 16).tolist()}), 400, "shape"),
        "strings in the tensor": (dict(json={"inputs": [[["a"]]]}), 400, "numbers"),
        "integer dtype": (dict(json={"inputs": good_shape, "dtype": "uint8"}), 400, "dtype"),
        "ragged tensor": (dict(json={"inputs": [[1.0], [1.0, 2.0]]}), 400, "rectangular"),
        "not JSON": (dict(content=b'{"inputs": [', headers={"content-type": "application/json"}), 400, "JSON"),
        "unsupported content type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
                                     "content type"),
        "text file as an image": (dict(files=[("files", ("a.txt", b"hello", "text/plain"))]), 415, "content type"),
        "too many images": (dict(files=_multipart(built["files"][:1] * (MAX_BATCH + 1))), 413, "max_batch"),
        "too many tensor items": (dict(json={"inputs": torch.zeros(MAX_BATCH + 1, 3, 32, 32).tolist()}), 413,
                                  "max_batch"),
        "body too large": (dict(content=b"0" * (MAX_BODY + 1), headers={"content-type": "application/json"}), 413,
                           "max_body_bytes"),
    }


BAD_REQUESTS = ["garbage bytes as a JPEG", "truncated JPEG", "wrong tensor shape", "strings in the tensor",
                "integer dtype", "ragged tensor", "not JSON", "unsupported content type", "text file as an image",
                "too many images", "too many tensor items", "body too large"]


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_request_gets_a_4xx_json_error_and_the_server_keeps_serving(server, built, case):
    kwargs, status, words = _bad_requests(built)[case]
    response = server["client"].post("/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower()
    assert len(_items(server["client"].post("/v1/predict", files=_multipart(built["files"][:2])))) == 2


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(server, built):
    files = built["files"][:16]
    expected = {p: _reference(built["ee"], built["info"], [p])[1][0] for p in files}

    def counter(name):
        text = server["client"].get("/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    runs, requests = counter("selfxit_microbatches_total"), counter("selfxit_microbatch_requests_total")
    start = threading.Barrier(len(files))

    def one(path):
        with httpx.Client(timeout=30) as client:
            start.wait(30)
            return path, client.post(f"{server['url']}/v1/predict", files=_multipart([path]))

    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(one, files))
    for path, response in answers:
        assert _items(response) == [expected[path]], path
    runs = counter("selfxit_microbatches_total") - runs
    requests = counter("selfxit_microbatch_requests_total") - requests
    assert requests == len(files) and runs < len(files)  # some requests shared an early-exit run


def _other_backbone_bundle(path):
    """A bundle made for cifar_resnet56 (one untrained head): the ResNet-20 server must refuse it."""
    model, _ = load_backbone("cifar_resnet56")
    cand = Candidate("layer2", (32, 16, 16), 1)  # built directly: wrap() would spend seconds counting FLOPs
    ee = EarlyExitModel(model, (3, 32, 32), 10, [cand], backbone_flops=2)
    torch.manual_seed(0)
    ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, ee.num_classes), 1.0, 0.9,
                               spec=DEFAULT_HEAD, shape=cand.shape, head_flops=1)])
    return ee.save(path)


def test_hot_reload_refuses_bad_bundles_and_switches_to_a_good_one(server, built):
    client, bundle, files = server["client"], server["bundle"], built["files"][:6]
    _, old = _reference(built["ee"], built["info"], files)

    def health():
        return client.get("/healthz").json()

    # 1. a corrupt manifest, seen by the folder watcher: refused, reported, the old bundle keeps serving
    (bundle / "manifest.json").write_text("{ not json")
    report = _wait_until(lambda: (h := health())["status"] == "degraded" and h, 15, "the corrupt bundle refusal")
    assert "not valid JSON" in report["last_reload"]["error"] and report["bundle"]["generation"] == 1
    response = client.post("/v1/predict", files=_multipart(files))
    assert _items(response) == old and response.json()["bundle"] == 1

    # 2. a bundle for another backbone, via the admin endpoint: refused with a 409 naming the problem
    _other_backbone_bundle(bundle)
    refused = client.post("/v1/reload")
    assert refused.status_code == 409 and "built for backbone" in refused.json()["error"]
    assert health()["status"] == "degraded" and _items(client.post("/v1/predict", files=_multipart(files))) == old

    # 3. a valid new bundle (every sample exits at the first exit), written while requests are in flight
    new = selfxit.load(built["path"], built["model"])
    first = next(iter(new.thresholds))
    new.thresholds = {**new.thresholds, first: 0.0}
    statuses, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server["url"], timeout=30) as c:
            deadline = time.monotonic() + 30
            while not stop.is_set() and len(statuses) < 300 and time.monotonic() < deadline:
                statuses.append(c.post("/v1/predict", files=_multipart(files[:2])).status_code)

    background = threading.Thread(target=traffic)
    background.start()
    try:
        time.sleep(0.3)
        new.save(bundle)
        _wait_until(lambda: health()["bundle"]["generation"] == 2, 15, "the new bundle to be served")
        time.sleep(0.3)
    finally:
        stop.set()
        background.join(35)
    assert statuses and set(statuses) == {200}  # nothing dropped or failed across the switch
    assert health()["status"] == "ok"
    _, expected = _reference(selfxit.load(bundle, built["model"]), built["info"], files)
    response = client.post("/v1/predict", files=_multipart(files))
    assert _items(response) == expected and {e for _, e in expected} == {first}
    assert response.json()["bundle"] == 2


def test_traffic_logger_hook_sees_every_item_and_feeds_live_agreement(built):
    """The app served by uvicorn in this process: the hook gets each answered item; its agreement reaches /metrics."""
    import uvicorn

    from selfxit.serve.app import BundleLoader, ServeConfig, ServedItem, create_app

    class Recorder:
        def __init__(self):
            self.items = []

        def on_result(self, item):
            self.items.append(item)

        def live_agreement(self):
            return (0.97, len(self.items)) if self.items else None

    recorder = Recorder()
    config = ServeConfig(bundle=built["path"], max_wait_ms=0, reload_poll_s=0)
    app = create_app(BundleLoader(built["path"], "cifar_resnet20"), config, traffic_logger=recorder)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started, 30, "the in-process server")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert "selfxit_live_agreement" not in client.get("/metrics").text
            response = client.post("/v1/predict", files=_multipart(built["files"][:3]))
            assert response.status_code == 200
            metrics = client.get("/metrics").text
    finally:
        server.should_exit = True
        thread.join(15)
    assert sorted(item.index for item in recorder.items) == [0, 1, 2]
    assert all(isinstance(item, ServedItem) and item.endpoint == "predict" for item in recorder.items)
    assert recorder.items[0].input.shape == (3, 32, 32) and recorder.items[0].bundle_generation == 1
    assert "selfxit_live_agreement 0.97" in metrics and "selfxit_shadow_samples 3" in metrics


def test_served_traffic_is_logged_and_shadow_runs_measure_live_agreement(built, tmp_path):
    """--log with every item logged and shadow-run: the log holds the JPEG bytes, the exit, the bundle version
    and the backbone's softmax; /v1/monitor and /metrics report live agreement and hit rates."""
    from selfxit.ops.traffic import TrafficLog
    serving = tmp_path / "bundle"
    shutil.copytree(built["path"], serving)
    run = _serve(serving, tmp_path / "server.log", ["--log", str(tmp_path / "traffic"), "--log-fraction", "1",
                                                     "--shadow-fraction", "1"])
    srv = next(run)
    files = built["files"][:6]
    response = srv["client"].post("/v1/predict", files=_multipart(files))
    assert response.status_code == 200
    # the monitor runs after the answers went out, so it may lag the response a little
    monitor = _wait_until(lambda: (m := srv["client"].get("/v1/monitor").json())["logging"]["logged"] == 6 and m,
                          30, "the monitor to account for the request")
    metrics = srv["client"].get("/metrics").text
    version = srv["client"].get("/healthz").json()["bundle"]["manifest_sha256"]
    srv["proc"].terminate()  # a clean shutdown flushes the log
    srv["proc"].wait(20)
    run.close()
    assert monitor["items"] == 6 and monitor["shadow_samples"] == 6 and monitor["logging"]["logged"] == 6
    assert 0 <= monitor["live_agreement"] <= 1 and sum(monitor["hit_rates"].values()) == pytest.approx(1)
    assert "selfxit_live_agreement" in metrics and 'selfxit_exit_hit_rate{exit="final"}' in metrics
    records = sorted(TrafficLog(tmp_path / "traffic").read(), key=lambda r: r.encoded)
    assert len(records) == 6
    sent = sorted(f.read_bytes() for f in files)
    assert [r.encoded for r in records] == sent and all(r.content_type == "image/jpeg" for r in records)
    _, expected = _reference(built["ee"], built["info"], files)
    by_bytes = {f.read_bytes(): e for f, e in zip(files, expected)}
    reference_ee = built["ee"]
    for r in records:
        assert (r.prediction, r.exit) == by_bytes[r.encoded]
        assert r.shadow and r.bundle_version == version and r.backbone_probs.shape == (reference_ee.num_classes,)
    agree = np.mean([int(np.argmax(r.backbone_probs)) == r.prediction for r in records])
    assert monitor["live_agreement"] == pytest.approx(agree)


def test_a_full_disk_switches_logging_off_and_the_server_keeps_serving(built, tmp_path):
    """A real server process whose file size limit runs out mid-log: every request is still answered, and
    /healthz says logging is off and why."""
    import resource

    serving = tmp_path / "bundle"
    shutil.copytree(built["path"], serving)

    def small_files():  # the traffic shard hits this limit after a few dozen JPEGs (SIGXFSZ is ignored by Python)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))

    run = _serve(serving, tmp_path / "server.log", ["--log", str(tmp_path / "traffic"), "--log-fraction", "1",
                                                     "--shadow-fraction", "0"], preexec_fn=small_files)
    srv = next(run)
    try:
        statuses = [srv["client"].post("/v1/predict", files=_multipart(built["files"][:10])).status_code
                    for _ in range(12)]
        time.sleep(1.5)  # the idle buffer is flushed by the log's timer; its error surfaces on the next append
        statuses.append(srv["client"].post("/v1/predict", files=_multipart(built["files"][:2])).status_code)
        health = srv["client"].get("/healthz").json()
    finally:
        run.close()
    assert statuses == [200] * 13
    logging_state = health["monitor"]["logging"]
    assert logging_state["enabled"] is False and logging_state["error"], logging_state
    assert "traffic" in logging_state["error"] or "shard" in logging_state["error"]
