"""The server as a real process on loopback under what a schema cannot express: broken framing, lying
Content-Length, oversize chunked bodies, truncated multipart, deep JSON, bad WebSocket messages, pixel
bombs, overload and SIGTERM. Every case expects a 4xx or a clean close, never a 5xx, a reset or a hang
(sockets have timeouts), and the server keeps serving. The probes are those of
``benchmarks/reliability_serve.py``, at small counts here."""
import io
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

TOKEN = "reliability-admin-token-0123"
MAX_BODY = 1_000_000
LIMITS = ["--max-batch", "8", "--max-body-bytes", str(MAX_BODY), "--read-timeout-s", "2", "--max-wait-ms", "5"]
GOOD = {"inputs": torch.zeros(2, 3, 32, 32).tolist()}


@pytest.fixture(scope="module")
def server(reliability, quick_bundle):
    with reliability.ServeProcess(quick_bundle, "cifar_resnet20", LIMITS, env={"SELFXIT_ADMIN_TOKEN": TOKEN}) as srv:
        yield srv


def _healthy(server):
    assert httpx.post(f"{server.url}/v1/predict", json=GOOD, timeout=30).status_code == 200
    assert "Traceback" not in server.log_text()


def _raw(method_path: str, headers: dict, body: bytes = b"") -> bytes:
    head = [method_path + " HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _multipart(body: bytes) -> bytes:
    return (b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            + body)


DEEP = b"[" * 10_000 + b"]" * 10_000
CHUNK = b"%x\r\n%s\r\n" % (65536, b"1" * 65536)
RAW_CASES = {  # name -> (request bytes, bytes streamed after it, what is acceptable)
    "garbage request line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", (), "4xx_or_close"),
    "header line without a colon": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", (), "4xx_or_close"),
    "negative content length": (_raw("POST /v1/predict", {"Content-Length": "-1"}), (), "4xx_or_close"),
    "content length and chunked": (_raw("POST /v1/predict", {"Content-Length": "5", "Transfer-Encoding": "chunked",
                                                             "Content-Type": "application/json"}, b"0\r\n\r\n"),
                                   (), "4xx_or_close"),
    "bad chunk size": (_raw("POST /v1/predict", {"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
                            b"zz\r\nabc\r\n"), (), "4xx_or_close"),
    "content length shorter than the body": (_raw("POST /v1/predict", {"Content-Length": "10", "Content-Type":
                                                                       "application/json"}, b'{"inputs": [[1]]}'),
                                             (), "4xx_or_close"),
    "content length promising more than is sent": (_raw("POST /v1/predict", {"Content-Length": "5000", "Content-Type":
                                                                             "application/json"}, b'{"inputs": ['),
                                                   (), "4xx"),  # 408 after --read-timeout-s
    "request head that never ends": (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty", (), "close"),
    "declared body over the limit": (_raw("POST /v1/predict", {"Content-Length": str(MAX_BODY + 1),
                                                               "Content-Type": "application/json"}), (), "4xx"),
    "oversize chunked body": (_raw("POST /v1/predict", {"Transfer-Encoding": "chunked",
                                                        "Content-Type": "application/json"}),
                              (CHUNK,) * (MAX_BODY // 65536 + 4) + (b"0\r\n\r\n",), "4xx"),
    "truncated multipart": (_raw("POST /v1/predict", {"Content-Length": "120", "Content-Type":
                                                      "multipart/form-data; boundary=B"}, _multipart(b"\xff\xd8\xff")),
                            (), "4xx"),
    "multipart without a boundary": (_raw("POST /v1/predict", {"Content-Length": "3", "Content-Type":
                                                               "multipart/form-data"}, b"abc"), (), "4xx"),
    "deep JSON": (_raw("POST /v1/predict", {"Content-Length": str(len(DEEP)), "Content-Type": "application/json"},
                       DEEP), (), "4xx"),
    "websocket upgrade without a key": (_raw("GET /v1/stream", {"Upgrade": "websocket", "Connection": "Upgrade",
                                                                "Sec-WebSocket-Version": "13"}), (), "4xx_or_close"),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_socket_abuse_gets_a_4xx_or_a_clean_close_never_a_5xx_or_a_hang(server, reliability, name):
    data, chunks, expect = RAW_CASES[name]
    case = reliability.HttpCase(name, data, "4xx_or_close", chunks=chunks)
    outcome, status, _ = reliability.exchange(server.port, case, timeout=15)
    assert outcome in ("answer", "closed"), (outcome, status)  # not a reset, not a timeout (a hang)
    if expect == "4xx":
        assert outcome == "answer" and 400 <= status < 500, (outcome, status)
    elif expect == "close":
        assert outcome == "closed"
    else:
        assert outcome == "closed" or 400 <= status < 500, (outcome, status)
    _healthy(server)


def test_errors_carry_the_request_id_the_server_logs_them_under(server):
    response = httpx.post(f"{server.url}/v1/predict", json={"inputs": GOOD["inputs"], "dtype": ["float32"]}, timeout=30)
    assert response.status_code == 400 and "'dtype' must be one of" in response.json()["error"]
    assert response.json()["request_id"] == int(response.headers["x-request-id"])
    ok = httpx.post(f"{server.url}/v1/predict", json=GOOD, timeout=30)
    assert ok.json()["request_id"] == int(ok.headers["x-request-id"]) > response.json()["request_id"]
    not_found = httpx.delete(f"{server.url}/v1/predict", timeout=30)
    assert not_found.status_code == 405 and not_found.headers["allow"] == "POST" and "request_id" in not_found.json()


def test_non_finite_inputs_get_400_and_the_issue_payloads_no_5xx(server):
    x = torch.zeros(1, 3, 32, 32).tolist()
    x[0][0][0][0] = 1e39
    response = httpx.post(f"{server.url}/v1/predict", json={"inputs": x, "dtype": "float64"}, timeout=30)
    assert response.status_code == 400 and "finite" in response.json()["error"]
    response = httpx.post(f"{server.url}/v1/predict", content=DEEP, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 400 and "limit is 32" in response.json()["error"]
    _healthy(server)


def _flat_png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (3, 4, 5)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_request_over_the_pixel_budget_gets_413_naming_it(server):
    """max_batch 8 -> 8 x 512 x 512 pixels per request; 8 flat 2000x2000 PNGs are 12 kB each but 32 M pixels."""
    files = [("files", (f"{i}.png", _flat_png(2000, 2000), "image/png")) for i in range(8)]
    response = httpx.post(f"{server.url}/v1/predict", files=files, timeout=30)
    assert response.status_code == 413, response.text
    assert "max_request_pixels 2,097,152" in response.json()["error"]
    small = [("files", ("s.png", _flat_png(500, 500), "image/png"))] * 8
    assert httpx.post(f"{server.url}/v1/predict", files=small, timeout=30).status_code == 200


def test_reload_needs_the_admin_token(server):
    url = f"{server.url}/v1/reload"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.post(url, headers=headers, timeout=60)
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in response.json()["error"]
    response = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == 200 and response.json()["reloaded"]
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert schema["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"


def test_bad_websocket_messages_get_an_error_and_the_socket_stays_open(server):
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    with connect(url, open_timeout=10, max_size=None) as ws:
        for message in (DEEP.decode(), "[1]", "null", json.dumps({"inputs": GOOD["inputs"], "dtype": [1], "id": 7}),
                        json.dumps({"inputs": [[[[float("1e39")]]]]}), b"\x00 not an image"):
            ws.send(message)
            error = json.loads(ws.recv(timeout=30))
            assert error["type"] == "error" and 400 <= error["status"] < 500 and error["request_id"], error
        assert error["id"] is None
        ws.send(json.dumps({**GOOD, "id": "ok"}))
        answers = [json.loads(ws.recv(timeout=30)) for _ in range(3)]
        assert [a["type"] for a in answers] == ["result", "result", "done"] and answers[-1]["id"] == "ok"
    for message, code in ((b'{"inputs": "\xff"}', 1007), (b"\x00" * (MAX_BODY + 1), 1009)):
        with connect(url, open_timeout=10, max_size=None) as ws:
            ws.send(message, text=code == 1007)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    _healthy(server)


def test_binding_beyond_loopback_without_a_token_is_refused_at_start_up(quick_bundle):
    env = {k: v for k, v in os.environ.items() if k != "SELFXIT_ADMIN_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "selfxit", "serve", "--bundle", str(quick_bundle), "--model",
                           "cifar_resnet20", "--host", "0.0.0.0", "--port", "9"], env={**env, "NNI_FRAMEWORK": "none"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "without an admin token" in proc.stderr and "--trusted-network" in proc.stderr


@pytest.mark.slow
def test_malformed_request_and_message_fuzz_gets_no_5xx_drop_or_hang(server, reliability, jpeg):
    figures = reliability.fuzz_http(server.port, 400, jpeg, seed=3, max_body=MAX_BODY, slow_every=200)
    assert {k: figures[k] for k in ("server_errors", "resets", "hangs", "unexpected_drops", "good_failed",
                                    "wrong_status")} == dict.fromkeys(("server_errors", "resets", "hangs",
                                                                       "unexpected_drops", "good_failed",
                                                                       "wrong_status"), 0), figures
    ws = reliability.fuzz_ws(server.port, 80, jpeg, seed=3, max_body=MAX_BODY)
    assert ws["ws_server_errors"] == ws["ws_drops"] == ws["ws_hangs"] == ws["ws_good_failed"] == 0, ws
    assert ws["ws_wrong_answer"] == 0, ws
    assert reliability.metric_5xx(server.url) == 0
    _healthy(server)


@pytest.mark.slow
def test_overload_gets_503_with_retry_after_and_no_reset(reliability, quick_bundle, jpeg):
    upload = {"files": [("files", ("a.jpg", jpeg, "image/jpeg"))] * 8}
    with reliability.ServeProcess(quick_bundle, "cifar_resnet20", [*LIMITS, "--max-queue-wait-ms", "150"]) as srv:
        figures = reliability.load_probe(srv.url, upload, clients=32, seconds=8)
        assert "Traceback" not in srv.log_text()
    assert figures["resets"] == figures["bad_503"] == figures["other"] == figures["timeouts"] == 0, figures
    assert figures["answered"] > 0 and figures["503_retry_after"] > 0, figures


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_flushes_the_traffic_log(reliability, quick_bundle, jpeg, tmp_path):
    from selfxit.ops.traffic import TrafficLog

    upload = {"files": [("files", ("a.jpg", jpeg, "image/jpeg"))] * 8}
    extra = [*LIMITS, "--drain-timeout-s", "10", "--log", str(tmp_path / "traffic"), "--log-fraction", "1",
             "--shadow-fraction", "0"]
    with reliability.ServeProcess(quick_bundle, "cifar_resnet20", extra) as srv:
        figures = reliability.sigterm_probe(srv, upload, clients=12, before_s=2.0)
    assert figures["cut_off"] == figures["in_flight_lost"] == figures["bad_503"] == 0, figures
    assert figures["answered"] > 0 and figures["in_flight_at_signal"] > 0 and figures["refused"] > 0, figures
    assert figures["drained"] and not figures["traceback"] and figures["exit_s"] < 12, figures
    assert len(list(TrafficLog(tmp_path / "traffic").read())) == 8 * figures["answered"]


@pytest.mark.slow
def test_reloads_under_load_never_fail_a_request(server, reliability, jpeg):
    """A reload builds (traces) the new bundle's runner while uploads are decoded and batches run: torch.fx
    patches every module call process-wide while it traces, so without the gate this failed requests."""
    import threading
    import time

    upload = {"files": [("files", ("a.jpg", jpeg, "image/jpeg"))] * 4}
    figures: dict = {}
    load = threading.Thread(target=lambda: figures.update(reliability.load_probe(server.url, upload, 6, 10)))
    load.start()
    statuses = []
    for _ in range(8):
        time.sleep(0.5)
        statuses.append(httpx.post(f"{server.url}/v1/reload", headers={"Authorization": f"Bearer {TOKEN}"},
                                   timeout=60).status_code)
    load.join(60)
    assert statuses == [200] * 8 and figures["answered"] == figures["requests"] > 0, (statuses, figures)
    _healthy(server)
