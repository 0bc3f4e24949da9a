"""Serving on the bucketed runtime: micro-batches padded to buckets, every bucket warm before ready, /healthz."""
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import selfxit
from selfxit.core.bucketed import RuntimeConfig
from selfxit.serve.app import BundleLoader, ServeConfig, create_app
from selfxit.zoo import load_backbone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(app):
    import uvicorn
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("plain", [False, True])
def test_bucketed_serving_warms_every_bucket_and_answers_like_the_bundle(quick_bundle, plain):
    backbone, info = load_backbone("cifar_resnet20")
    runtime = RuntimeConfig(engine="buckets", max_batch=8).validate()
    config = ServeConfig(bundle=quick_bundle, max_wait_ms=0, reload_poll_s=0, max_batch=8, max_microbatch=8,
                         shadow_fraction=1.0, device="cpu", engine="buckets")
    app = create_app(BundleLoader.from_backbone(quick_bundle, backbone, info, plain=plain, runtime=runtime), config)
    torch.manual_seed(1)
    x = torch.randn(5, 3, 32, 32)
    reference = selfxit.load(quick_bundle, backbone)
    if plain:
        reference.thresholds = {}
    expected = reference(x)  # the hook runtime, in this process
    server, thread, url = _serving(app)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            health = client.get("/healthz").json()
            response = client.post("/v1/predict", json={"inputs": x.tolist()})
            deadline = time.monotonic() + 30  # the shadow runs come after the answers went out
            while (monitor := client.get("/v1/monitor").json())["items"] < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(15)
    assert health["runtime"] == {"engine": "buckets", "compile": "off", "device": "cpu", "buckets": [1, 2, 4, 8],
                                 "warm_buckets": [1, 2, 4, 8]}
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    names = list(reference.thresholds)
    assert [item["class"] for item in items] == expected.predictions.tolist()
    assert [item["exit"] for item in items] == ["final" if e < 0 else names[e] for e in expected.exit.tolist()]
    with torch.no_grad():  # every item shadow-run: live agreement is the in-process agreement with the backbone
        agreement = float((expected.predictions == backbone(x).argmax(1)).float().mean())
    assert monitor["shadow_samples"] == 5 and monitor["live_agreement"] == pytest.approx(agreement)


def test_the_hook_runtime_reports_no_buckets(quick_bundle):
    backbone, info = load_backbone("cifar_resnet20")
    app = create_app(BundleLoader.from_backbone(quick_bundle, backbone, info),
                     ServeConfig(bundle=quick_bundle, reload_poll_s=0))
    server, thread, url = _serving(app)
    try:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    finally:
        server.should_exit = True
        thread.join(15)
    assert health["runtime"]["engine"] == "hooks" and health["runtime"]["warm_buckets"] == []


def test_a_ladder_that_does_not_cover_the_microbatch_is_refused_at_start_up():
    with pytest.raises(ValueError, match="does not cover the maximum batch 64"):
        ServeConfig(max_microbatch=64, engine="buckets", buckets=(1, 8, 32)).runtime()
    assert ServeConfig().runtime() is None  # cpu default: the exact hook runtime
    assert ServeConfig(device="cuda").runtime().engine == "buckets"
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        ServeConfig(device="tpu").validate()


@pytest.mark.slow
def test_the_command_line_refuses_that_ladder_before_loading_a_model(tmp_path):
    cmd = [sys.executable, "-m", "selfxit", "serve", "--bundle", str(tmp_path), "--model", "cifar_resnet20",
           "--engine", "buckets", "--buckets", "1,8,32", "--max-microbatch", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "NNI_FRAMEWORK": "none"})
    assert done.returncode != 0 and "does not cover the maximum batch 64" in done.stderr
