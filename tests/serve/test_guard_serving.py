"""The live guard wired into serving: shadow samples feed it, its moves change the served thresholds,
/v1/monitor, /healthz and /metrics show it, guard.json keeps it for the nightly job; start-up refusals."""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from selfxit.core.exits import CertifiedFamily

MODEL = "cifar_resnet20"


def _quick_ee(family: CertifiedFamily | None):
    """A ResNet-20 bundle with one untrained head at layer2 (as the conftest's quick_bundle) and a hand-made
    certified family: at scale 1 its threshold 0.105 lets every item exit there, with a random answer, so the
    served answers disagree with the backbone ~90% of the time (far past any tolerance); one step stricter
    (0.75: threshold 0.33) no item exits and agreement is restored."""
    from selfxit.api import EarlyExitModel
    from selfxit.core.candidates import Candidate
    from selfxit.core.exits import ExitRecord
    from selfxit.core.heads import DEFAULT_HEAD, build_head
    from selfxit.zoo import load_backbone

    model, _ = load_backbone(MODEL)
    cand = Candidate("layer2", (32, 16, 16), 1)
    ee = EarlyExitModel(model, (3, 32, 32), 10, [cand], backbone_flops=2)
    torch.manual_seed(0)
    ee.set_records([ExitRecord(cand.name, build_head(DEFAULT_HEAD, cand.shape, ee.num_classes), 1.0, 0.105,
                               spec=DEFAULT_HEAD, shape=cand.shape, head_flops=1)])
    ee.family = family
    return ee


FAMILY = CertifiedFamily({"layer2": 0.105}, 1.0, [0.25, 0.5, 0.75, 1.0], 0.05, 0.1)


@pytest.fixture(scope="session")
def guarded_bundle(shared, tmp_path_factory):
    return _quick_ee(FAMILY).save(tmp_path_factory.mktemp("guarded") / "bundle")


@pytest.fixture(scope="session")
def images(shared):
    from selfxit.zoo import load_backbone
    from selfxit.zoo.data import ImageFolderData

    _, info = load_backbone(MODEL)
    data = ImageFolderData(shared / "data" / "cifar10-test", info, max_samples=160, seed=3)
    return torch.stack([data[i][0] for i in range(160)])


def _wait(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _predict(client, x, tries=20):
    """POST a batch, waiting out 503s (admission by expected wait answers them on a loaded machine)."""
    for _ in range(tries):
        response = client.post("/v1/predict", json={"inputs": x.tolist()})
        if response.status_code != 503:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


# ---- in process (fast) ---------------------------------------------------------------------------------
def test_guard_problem_names_each_reason():
    from selfxit.serve.guarding import guard_problem

    assert "no certified family" in guard_problem(SimpleNamespace(family=None))
    no_scale = CertifiedFamily({"layer2": 0.5}, None, [0.5, 1.0], 0.05, 0.1)
    assert "certified no scale" in guard_problem(SimpleNamespace(family=no_scale))
    learned = SimpleNamespace(family=FAMILY, gate="learned", records={"layer2": None})
    assert "learned-gate" in guard_problem(learned)
    assert guard_problem(SimpleNamespace(family=FAMILY, gate="confidence", records={"layer2": None})) is None


def test_config_refuses_bad_guard_flags():
    from selfxit.serve.config import ServeConfig

    for kwargs, flag in [({"guard_alpha": 0.0}, "--guard-alpha"), ({"guard_alpha": 1.5}, "--guard-alpha"),
                         ({"shadow_fraction": 0.5, "guard_max_shadow": 0.1}, "--guard-max-shadow"),
                         ({"plain": True}, "--plain")]:
        with pytest.raises(ValueError, match=flag):
            ServeConfig(guard=True, **kwargs).validate()
    ServeConfig(guard=True, shadow_fraction=0.5).validate()  # default cap: max(0.2, shadow fraction)


def test_guard_tightens_in_process_and_keeps_its_state(guarded_bundle, images, tmp_path):
    from fastapi.testclient import TestClient

    from selfxit.serve.app import create_app
    from selfxit.serve.config import ServeConfig

    log = tmp_path / "log"
    config = ServeConfig(bundle=guarded_bundle, model=MODEL, shadow_fraction=1.0, guard=True, log=str(log),
                         log_fraction=0.0, reload_poll_s=0, max_wait_ms=1)
    app = create_app(config=config)
    with TestClient(app) as client:
        before = client.get("/v1/monitor").json()["guard"]
        assert before["active"] and not before["alarmed"] and before["scale"] == before["certified_scale"] == 1.0
        failed = 0
        for start in range(0, 160, 16):
            response = client.post("/v1/predict", json={"inputs": images[start:start + 16].tolist()})
            failed += response.status_code != 200
        assert failed == 0
        guard = _wait(lambda: (g := client.get("/v1/monitor").json()["guard"])["alarmed"] and g, 30, "an alarm")
        assert guard["scale"] < guard["certified_scale"] and guard["tightened"] >= 1
        assert client.get("/healthz").json()["guard"]["alarmed"]
        # the served thresholds follow the guard: at scale 0.75 nothing exits, every later item reaches the backbone
        assert client.get("/healthz").json()["bundle"]["exits"][0]["threshold"] == pytest.approx(1 - 0.75 * 0.895)
        items = client.post("/v1/predict", json={"inputs": images[:8].tolist()}).json()["items"]
        assert {item["exit"] for item in items} == {"final"}
        metrics = client.get("/metrics").text
        assert "selfxit_guard_alarmed 1.0" in metrics and "selfxit_guard_scale 0.75" in metrics
        assert 'selfxit_guard_moves_total{kind="tighten"} 1.0' in metrics
        assert 'selfxit_guard_moves_total{kind="relax"} 0.0' in metrics
        state = json.loads((log / "guard.json").read_text())
        assert state["alarmed"] and state["scale"] == 0.75 and state["certified_scale"] == 1.0
        assert state["moves"][0]["kind"] == "tighten" and state["alarmed_since"] == state["moves"][0]["at"]
    assert json.loads((log / "guard.json").read_text())["alarmed"]  # written again at shutdown


def test_keeper_raises_the_shadow_fraction_while_alarmed_and_applies_between_batches(shared, images, tmp_path):
    from selfxit.serve.guarding import GuardKeeper

    ee = _quick_ee(FAMILY)
    moves = []
    keeper = GuardKeeper(0.05, 0.1, 0.5, tmp_path / "guard.json", moves.append)
    keeper.prepare(ee, strict=True)
    assert keeper.shadow_fraction(ee) == 0.1 and json.loads((tmp_path / "guard.json").read_text())["active"]
    served = SimpleNamespace(ee=ee, exit_names=["layer2"], describe={"exits": []})
    for start in range(0, 160, 16):
        keeper.observe(ee, keeper.current.shadow(images[start:start + 16]))
        if moves:
            break
    assert moves == ["tighten"] and keeper.shadow_fraction(ee) == 0.5  # alarmed: more evidence, faster
    assert ee.thresholds["layer2"] == pytest.approx(0.105)  # not applied until the worker asks, between batches
    assert keeper.apply(served) and ee.thresholds["layer2"] == pytest.approx(1 - 0.75 * 0.895)
    assert served.describe["exits"][0]["threshold"] == ee.thresholds["layer2"] and not keeper.apply(served)


def test_no_guard_no_guard_metrics(guarded_bundle):
    from fastapi.testclient import TestClient

    from selfxit.serve.app import create_app
    from selfxit.serve.config import ServeConfig

    app = create_app(config=ServeConfig(bundle=guarded_bundle, model=MODEL, reload_poll_s=0))
    with TestClient(app) as client:
        assert "guard" not in client.get("/v1/monitor").json()
        assert "selfxit_guard" not in client.get("/metrics").text


def test_reload_restarts_the_guard_and_an_unguardable_reload_serves_unguarded(guarded_bundle, images, tmp_path):
    from fastapi.testclient import TestClient

    from selfxit.serve.app import create_app
    from selfxit.serve.config import ServeConfig

    serving = tmp_path / "bundle"
    shutil.copytree(guarded_bundle, serving)
    config = ServeConfig(bundle=serving, model=MODEL, shadow_fraction=1.0, guard=True, reload_poll_s=0,
                         guard_state=str(tmp_path / "state.json"), max_wait_ms=1)
    with TestClient(create_app(config=config)) as client:
        for start in range(0, 160, 32):
            assert _predict(client, images[start:start + 32]).status_code == 200
        _wait(lambda: client.get("/v1/monitor").json()["guard"]["alarmed"], 30, "an alarm")
        assert client.post("/v1/reload").status_code == 200  # the same bundle again: a fresh guard
        assert _predict(client, images[:2]).status_code == 200
        guard = _wait(lambda: (g := client.get("/v1/monitor").json()["guard"])["moves"] == 0 and g, 30, "a restart")
        assert not guard["alarmed"] and guard["scale"] == 1.0
        _quick_ee(None).save(serving)  # a bundle without a family: served, unguarded, and /healthz says why
        assert client.post("/v1/reload").status_code == 200
        assert _predict(client, images[:2]).status_code == 200
        guard = _wait(lambda: (g := client.get("/healthz").json()["guard"])["active"] is False and g, 30, "guard off")
        assert "no certified family" in guard["reason"]
    assert json.loads((tmp_path / "state.json").read_text())["active"] is False


# ---- a real server process --------------------------------------------------------------------------------
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(bundle, port, *extra):
    return [sys.executable, "-m", "selfxit", "serve", "--bundle", str(bundle), "--model", MODEL, "--host",
            "127.0.0.1", "--port", str(port), "--threads", "1", "--reload-poll-s", "0", "--log-level", "warning",
            *extra]


@pytest.mark.parametrize("extra, flag", [
    (["--guard-alpha", "1.5"], "--guard-alpha"),
    (["--guard-alpha", "0"], "--guard-alpha"),
    (["--shadow-fraction", "0.5", "--guard-max-shadow", "0.1"], "--guard-max-shadow"),
])
def test_startup_refuses_bad_guard_flags(guarded_bundle, extra, flag):
    proc = subprocess.run(_serve_cmd(guarded_bundle, _free_port(), "--guard", *extra), capture_output=True,
                          text=True, timeout=120, env={**os.environ, "NNI_FRAMEWORK": "none"})
    assert proc.returncode != 0 and flag in proc.stderr, proc.stderr[-2000:]


def test_startup_refuses_a_bundle_without_a_family(quick_bundle):
    proc = subprocess.run(_serve_cmd(quick_bundle, _free_port(), "--guard"), capture_output=True, text=True,
                          timeout=180, env={**os.environ, "NNI_FRAMEWORK": "none"})
    assert proc.returncode != 0 and "--guard" in proc.stderr and "no certified family" in proc.stderr, \
        proc.stderr[-2000:]


@pytest.mark.slow
def test_server_process_alarms_on_disagreeing_exits(guarded_bundle, images, tmp_path):
    """A real server with --guard and --shadow-fraction 1: exits that disagree with the backbone are found,
    the scale goes down, no request fails, and guard.json in the log folder says alarmed."""
    port, log = _free_port(), tmp_path / "log"
    out = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(_serve_cmd(guarded_bundle, port, "--guard", "--shadow-fraction", "1.0", "--log",
                                       str(log), "--log-fraction", "0", "--max-wait-ms", "2",
                                       "--max-queue-wait-ms", "60000"),  # busy shared cores: no 503 back-pressure
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NNI_FRAMEWORK": "none"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            def up():
                assert proc.poll() is None, (out.seek(0), out.read())[1]
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False
            _wait(up, 120, "the server")

            def send(start):
                return client.post("/v1/predict", json={"inputs": images[start:start + 8].tolist()}).status_code

            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(send, range(0, 160, 8)))
            assert statuses == [200] * 20
            guard = _wait(lambda: (g := client.get("/v1/monitor").json()["guard"])["alarmed"] and g, 60, "an alarm")
            assert guard["scale"] < guard["certified_scale"] == 1.0
            assert client.get("/healthz").json()["guard"]["alarmed"]
            metrics = client.get("/metrics").text
            for name in ("selfxit_guard_scale", "selfxit_guard_alarmed 1.0", 'selfxit_guard_moves_total{kind="tighten"}'):
                assert name in metrics
            assert all(send(s) == 200 for s in range(0, 32, 8))  # serving goes on after the move
            assert 'status="5' not in client.get("/metrics").text
    finally:
        proc.terminate()
        proc.wait(30)
        out.seek(0)
        text = out.read()
        out.close()
    assert "live guard tighten" in text, text[-2000:]
    state = json.loads((log / "guard.json").read_text())
    assert state["alarmed"] and state["moves"] and state["bundle_version"] is None
