"""Request hardening without a server: JSON depth and schema, finite inputs, pixel budgets, admission by
expected wait, the admin token and start-up rules, strict JSON answers, the torch.fx gate."""
import asyncio
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from selfxit.serve.config import ServeConfig, is_loopback
from selfxit.serve.requests import ApiError, check_depth, check_pixels, decode_images, parse_json_body


def _status(fn, *args):
    with pytest.raises(ApiError) as caught:
        fn(*args)
    return caught.value.status, caught.value.message


def _body(**fields) -> bytes:
    return json.dumps({"inputs": torch.zeros(1, 3, 4, 4).tolist(), **fields}).encode()


def test_deep_json_is_refused_before_parsing_and_names_the_limit():
    deep = b"[" * 10_000 + b"]" * 10_000
    start = time.perf_counter()
    status, message = _status(parse_json_body, deep, 8)
    assert status == 400 and "10000 levels" in message and "limit is 32" in message
    assert time.perf_counter() - start < 0.5
    check_depth(json.dumps({"inputs": [[[[1.0]]]], "id": "[[[[" * 100}))  # brackets inside strings do not count
    check_depth(b'{"id": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')  # nor after an escaped quote
    status, _ = _status(check_depth, b'{"id": ' + b'{"a": ' * 40 + b"1" + b"}" * 41)
    assert status == 400


@pytest.mark.parametrize("fields, words", [
    ({"dtype": ["float32"]}, "'dtype' must be one of float16, float32, float64"),
    ({"dtype": "uint8"}, "'dtype' must be one of"),
    ({"sets": [0.1]}, "'sets' must be a number in (0, 1)"),
    ({"sets": True}, "'sets' must be a number in (0, 1)"),
    ({"sets": "0.1"}, "'sets' must be a number in (0, 1)"),
    ({"sets": 2}, "'sets' must be a number in (0, 1)"),
])
def test_body_fields_are_validated_by_the_schema_models_with_messages_naming_them(fields, words):
    status, message = _status(parse_json_body, _body(**fields), 8)
    assert status == 400 and words in message, message


@pytest.mark.parametrize("body, words", [
    (b"[1, 2]", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"{}", "'inputs' is required"),
    (b'{"inputs": 5}', "'inputs' must be a nested list"),
    (b'{"inputs": [1', "not valid JSON"),
    (b'{"inputs": ["\xff"]}', "not valid JSON"),
    (b'{"inputs": [1' + b"0" * 5000 + b"]}", "not valid JSON"),
])
def test_malformed_bodies_get_400_naming_the_problem(body, words):
    status, message = _status(parse_json_body, body, 8)
    assert status == 400 and words in message, message


@pytest.mark.parametrize("value, dtype, words", [
    ("1e39", "float64", "finite"),  # a finite float64 that is infinite as float32: the 500
    ("1e39", "float32", "finite"),
    ("NaN", "float32", "finite"),
    ("-Infinity", "float32", "finite"),
    ("1e400", "float32", "finite"),
    ("65505", "float16", "within ±65504"),  # would round to a finite float16: the bound is on the value sent
    ("1e7", "float32", "within ±65504"),
])
def test_non_finite_or_huge_inputs_are_refused(value, dtype, words):
    body = _body(dtype=dtype).replace(b"0.0", value.encode(), 1)
    status, message = _status(parse_json_body, body, 8)
    assert status == 400 and words in message, message


def test_a_valid_body_gives_a_float32_tensor_and_its_alpha():
    x, alpha = parse_json_body(_body(dtype="float16", sets=0.05), 8)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 4, 4) and alpha == 0.05
    assert _status(parse_json_body, json.dumps({"inputs": [[0.0]] * 9}).encode(), 8)[0] == 413


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_request_pixel_budget_is_checked_from_headers_before_any_decode():
    """The issue's case: 64 flat PNGs of 4096x4095 (~1 MB in all) cost 7.8 s of decoding; now a 413 at once."""
    big = _png(4096, 4095)
    blobs = [(f"files[{i}]", big) for i in range(64)]
    config = ServeConfig()
    assert config.request_pixels == 64 * 512 * 512 == config.max_image_pixels
    start = time.perf_counter()
    status, message = _status(check_pixels, blobs, config.max_image_pixels, config.request_pixels)
    assert time.perf_counter() - start < 1.0
    assert status == 413 and "max_request_pixels 16,777,216" in message and "4096x4095" in message
    transform = lambda img: torch.zeros(3, 2, 2)  # noqa: E731
    assert _status(decode_images, blobs, transform, config.max_image_pixels, config.request_pixels)[0] == 413
    assert check_pixels(blobs[:1], config.max_image_pixels, config.request_pixels) == 4096 * 4095  # one still fits
    status, message = _status(check_pixels, [("x", _png(300, 300))], 50_000, 10**9)
    assert status == 413 and "max_image_pixels 50000" in message
    assert _status(check_pixels, [("x", b"\x89PNG\r\n\x1a\nbroken")], 10**6, 10**9)[0] == 400


def test_config_refuses_a_non_loopback_host_without_an_admin_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    with pytest.raises(ValueError, match="without an admin token"):
        ServeConfig(host="0.0.0.0").validate()
    ServeConfig(host="0.0.0.0", admin_token="x" * 16).validate()
    ServeConfig(host="0.0.0.0", trusted_network=True).validate()
    with pytest.raises(ValueError, match="at least 16"):
        ServeConfig(admin_token="short").validate()
    with pytest.raises(ValueError, match="max_queue_wait_ms"):
        ServeConfig(max_queue_wait_ms=0).validate()


def test_the_admin_token_is_checked_in_constant_time_and_says_how_to_send_it():
    from starlette.requests import Request

    from selfxit.serve.requests import check_admin

    def request(auth=None):
        headers = [(b"authorization", auth.encode())] if auth else []
        return Request({"type": "http", "method": "POST", "path": "/v1/reload", "headers": headers,
                        "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 1)})

    token = "s3cret-token-0123456789"
    check_admin(request(), None)  # no token configured: loopback or trusted network
    check_admin(request(f"Bearer {token}"), token)
    for auth in (None, "Bearer wrong", f"Basic {token}", f"Bearer {token}x"):
        status, message = _status(check_admin, request(auth), token)
        assert status == 401 and "Authorization: Bearer" in message


def test_admission_is_bounded_by_expected_wait_with_retry_after():
    from selfxit.serve.batching import Batcher, Job

    batcher = Batcher(ServeConfig(max_queue_wait_ms=100), lambda: None, lambda *a: None, None)
    loop = asyncio.new_event_loop()
    try:
        def job(n):
            return Job(torch.zeros(n, 1), loop, lambda item: None, 1, "predict", 0.0)

        batcher.submit(job(50))  # no service time measured yet: admitted
        batcher._timed(0.2, 100)  # 2 ms per item
        batcher.submit(job(10))  # 50 items ahead: 100 ms expected, at the limit
        with pytest.raises(ApiError) as caught:
            batcher.submit(job(1))  # 60 ahead: 120 ms > 100 ms
        assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
        assert "expected queue wait 120 ms exceeds max_queue_wait_ms 100" in caught.value.message
    finally:
        loop.close()


def test_a_request_with_nothing_queued_is_admitted_whatever_the_batch_in_progress_costs():
    """A lone client must not get 503 because the running batch (e.g. its shadow passes) is slow."""
    from selfxit.serve.batching import Batcher, Job

    batcher = Batcher(ServeConfig(max_queue_wait_ms=100), lambda: None, lambda *a: None, None)
    loop = asyncio.new_event_loop()
    try:
        batcher._timed(1.0, 10)  # 100 ms per item
        batcher.running_items = 64  # a big batch in progress: 6.4 s expected, but nothing queued
        batcher.submit(Job(torch.zeros(64, 1), loop, lambda item: None, 1, "predict", 0.0))
        with pytest.raises(ApiError) as caught:  # now 64 items are queued ahead of the next one
            batcher.submit(Job(torch.zeros(1, 1), loop, lambda item: None, 1, "predict", 0.0))
        assert caught.value.status == 503
    finally:
        loop.close()


def test_answers_never_hold_non_finite_numbers():
    from selfxit.serve.guard import dumps

    text = dumps({"probability": float("nan"), "items": [1.0, float("inf")], "ok": 0.5})
    assert json.loads(text) == {"probability": None, "items": [1.0, None], "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text


def test_the_trace_gate_keeps_decodes_out_while_a_runner_is_built():
    from selfxit.serve.batching import TraceGate

    gate, events = TraceGate(), []
    with gate.exclusive():
        reader = threading.Thread(target=lambda: (gate.shared().__enter__(), events.append("decoded")))
        reader.start()
        time.sleep(0.2)
        assert events == []  # blocked while the builder holds the gate
    reader.join(5)
    assert events == ["decoded"]


def test_docs_can_be_turned_off_and_the_schema_describes_the_served_model(tmp_path):
    from selfxit.api import EarlyExitModel
    from selfxit.serve.app import create_app

    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    ee = EarlyExitModel(backbone, (3, 2, 2), 3, [], backbone_flops=1)
    open_app = create_app(lambda: ee, ServeConfig(reload_poll_s=0))
    inputs = open_app.openapi()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["inputs"]
    assert (inputs["maxItems"], inputs["items"]["minItems"], inputs["items"]["items"]["items"]["maxItems"]) == (64, 3, 2)
    closed = create_app(lambda: ee, ServeConfig(reload_poll_s=0, docs=False))
    assert closed.openapi_url is None and closed.docs_url is None and closed.redoc_url is None
    assert np.isclose(inputs["items"]["items"]["items"]["items"]["maximum"], 65504)
