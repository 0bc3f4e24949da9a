"""Malformed requests and WebSocket messages for a `selfxit serve` process, generated from a seed.

Pure functions of a random generator and what the server's own ``/openapi.json`` says (the input shape and
``max_batch`` are read from the ``inputs`` schema), so the reliability probes need nothing from selfxit:
they see the server exactly as a client does. Each HTTP case is the raw bytes of one request (the framing
itself is one of the things fuzzed), with what is acceptable as an answer:

* ``"4xx"``: the request is well framed but wrong; the server must answer 4xx (a 2xx is tolerated only
  for mutations that may happen to stay valid, ``"any"``);
* ``"4xx_or_close"``: the framing is broken; a 4xx or a clean close (FIN, not a reset) is acceptable;
* ``"200"``: a good request interleaved with the bad ones, which must still be answered.

Never a 5xx, never a reset, never a hang (the client's socket timeout turns a hang into a failure).
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import dataclass

BOUNDARY = "reliabilityXboundary"


@dataclass
class HttpCase:
    kind: str  # family of the mutation, for the report
    data: bytes  # the whole request, head and body
    expect: str  # "4xx", "4xx_or_close", "any" (tolerated 2xx) or "200"
    slow: bool = False  # the server needs its read timeout to answer (lying Content-Length, partial head)
    chunks: tuple[bytes, ...] = ()  # sent after ``data`` (streamed bodies)


def png(width: int, height: int, rng: random.Random | None = None, claim: tuple[int, int] | None = None) -> bytes:
    """A valid RGB PNG (noise when ``rng`` is given); ``claim`` writes other dimensions in the header only."""
    rng = rng or random.Random(0)
    rows = b"".join(b"\x00" + bytes(rng.getrandbits(8) for _ in range(width * 3)) for _ in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    w, h = claim or (width, height)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def input_spec(openapi: dict) -> tuple[tuple[int, ...], int]:
    """(input shape without the batch, max_batch), read from the JSON body schema of ``POST /v1/predict``."""
    body = openapi["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    node = body["properties"]["inputs"]
    max_batch, shape = node["maxItems"], []
    node = node["items"]
    while node.get("type") == "array":
        shape.append(node["minItems"])
        node = node["items"]
    return tuple(shape), max_batch


def tensor(shape: tuple[int, ...], batch: int, rng: random.Random) -> list:
    if not shape:
        return [round(rng.uniform(-2, 2), 4) for _ in range(batch)]
    return [tensor(shape[1:], shape[0], rng) for _ in range(batch)]


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            content_length: int | None = None) -> bytes:
    """Raw HTTP/1.1 bytes; ``Connection: close`` so each case gets a connection of its own."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        head.append(f"{name}: {value}")
    if content_length is not None or body or method == "POST":
        head.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def multipart(files: list[tuple[str, bytes, str]], closed: bool = True, fields: dict[str, str] | None = None) -> bytes:
    out = b""
    for name, value in (fields or {}).items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for filename, data, ctype in files:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
JSON = "application/json"


def _flip(data: bytes, rng: random.Random, n: int = 3) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        if out:
            out[rng.randrange(len(out))] = rng.getrandbits(8)
    return bytes(out)


def _with_token(batch: list, token: str) -> str:
    """The body of ``batch`` with its first number replaced by the raw JSON text ``token`` (NaN, 1e400...)."""
    leaf = batch
    while isinstance(leaf[0], list):
        leaf = leaf[0]
    leaf[0], saved = "@@", leaf[0]
    text = json.dumps({"inputs": batch}).replace('"@@"', token, 1)
    leaf[0] = saved
    return text


def _deep(rng: random.Random) -> str:
    depth = rng.choice([33, 100, 1000, 10_000, 100_000])
    open_, close = rng.choice([("[", "]"), ('{"a":', "}"), ('{"inputs":', "}")])
    return open_ * depth + "1" + close * depth


def bad_json_bodies(shape, max_batch, rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(kind, body, expect) of JSON bodies that are wrong in one way each (a few may stay valid: 'any')."""
    good = tensor(shape, 1, rng)
    text = json.dumps({"inputs": good})
    bad_values = [None, True, 5, -1.5, "x", [], {}, [1, "a"], [[None]], 1e39, "0.5", [0.5]]
    value = rng.choice(bad_values)
    return [
        ("json-deep", _deep(rng).encode(), "4xx"),
        ("json-deep-in-field", ('{"inputs": [1], "id": ' + _deep(rng) + "}").encode(), "4xx"),
        ("json-dtype", json.dumps({"inputs": good, "dtype": value}).encode(), "4xx"),
        ("json-sets", json.dumps({"inputs": good, "sets": rng.choice([v for v in bad_values if v is not None]
                                                                     + [0, 1, 2, -0.1, 1e308])}).encode(), "4xx"),
        ("json-inputs-type", json.dumps({"inputs": value}).encode(), "4xx"),
        ("json-top-level", json.dumps(rng.choice([good, "s", 3, None, [text]])).encode(), "4xx"),
        ("json-shape", json.dumps({"inputs": tensor(tuple(max(1, s + rng.choice([-1, 1])) for s in shape), 1, rng)}
                                  ).encode(), "4xx"),
        ("json-rank", json.dumps({"inputs": tensor(shape[1:], 2, rng)}).encode(), "4xx"),
        ("json-ragged", text.replace("]", ", 1]", 1).encode(), "4xx"),
        ("json-nonfinite", json.dumps({"inputs": [["@"]]}).replace('"@"', ", ".join([rng.choice(
            ["NaN", "Infinity", "-Infinity", "1e39", "-3.5e38", "1e400", "1" + "0" * 5000])] + ["0.5"] * 2)).encode(),
         "4xx"),
        ("json-nonfinite-shaped", _with_token(good, rng.choice(["NaN", "-Infinity", "1e39", "1e400"])).encode(), "4xx"),
        ("json-huge-value", _with_token(good, rng.choice(["1e7", "-1e30", "3e38"])).encode(), "4xx"),
        ("json-too-many", json.dumps({"inputs": [[0.0]] * (max_batch + 1)}).encode(), "4xx"),
        ("json-empty", b"", "4xx"),
        ("json-truncated", text[: rng.randrange(1, len(text))].encode(), "4xx"),
        ("json-bytes-flipped", _flip(text.encode(), rng), "any"),
        ("json-invalid-utf8", b'{"inputs": [1], "id": "\xff\xfe"}', "4xx"),
        ("json-bom", b"\xef\xbb\xbf" + text.encode(), "any"),
        ("json-big-id", json.dumps({"inputs": good, "id": "x" * 10_000}).encode(), "any"),
        ("json-strings", json.dumps({"inputs": [[["a"] * 3]]}).encode(), "4xx"),
    ]


def bad_image_parts(jpeg: bytes, rng: random.Random, max_batch: int) -> list[tuple[str, bytes, str]]:
    """(kind, multipart body, expect) with one thing wrong in the images or the form."""
    ok = png(8, 8, rng)
    return [
        ("image-truncated", multipart([("a.jpg", jpeg[: rng.randrange(1, len(jpeg))], "image/jpeg")]), "4xx"),
        ("image-flipped", multipart([("a.jpg", _flip(jpeg, rng, 20), "image/jpeg")]), "any"),
        ("image-garbage", multipart([("a.jpg", bytes(rng.getrandbits(8) for _ in range(200)), "image/jpeg")]), "4xx"),
        ("image-text-type", multipart([("a.txt", b"hello", "text/plain")]), "4xx"),
        ("image-gif", multipart([("a.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif")]), "4xx"),
        ("image-pixel-bomb", multipart([("bomb.png", png(4, 4, rng, claim=(60_000, 60_000)), "image/png")]), "4xx"),
        ("image-request-bomb", multipart([("b.png", png(4, 4, rng, claim=(4000, 4000)), "image/png")] * 8), "4xx"),
        ("image-too-many", multipart([("a.png", ok, "image/png")] * (max_batch + 1)), "4xx"),
        ("image-none", multipart([], fields={"other": "1"}), "4xx"),
        ("image-text-field", multipart([], fields={"files": "not a file"}), "4xx"),
        ("multipart-truncated", multipart([("a.png", ok, "image/png")], closed=False)[:-rng.randrange(1, 30)], "4xx"),
        ("multipart-garbage", bytes(rng.getrandbits(8) for _ in range(300)), "4xx"),
    ]


def http_cases(shape, max_batch, jpeg: bytes, rng: random.Random, max_body: int) -> list[HttpCase]:
    """One round of every kind of malformed request (the caller shuffles and repeats rounds)."""
    cases = [HttpCase(k, request("POST", "/v1/predict", body, {"Content-Type": JSON}), e)
             for k, body, e in bad_json_bodies(shape, max_batch, rng)]
    cases += [HttpCase(k, request("POST", "/v1/predict", body, {"Content-Type": MULTIPART}), e)
              for k, body, e in bad_image_parts(jpeg, rng, max_batch)]
    body = json.dumps({"inputs": tensor(shape, 1, rng)}).encode()
    junk = rng.choice(["abc", "2", "-1", "nan", "inf", "%00", "%ff%fe", "0.5" * 100, "1e-400", ""])
    cases += [
        HttpCase("query-sets", request("POST", f"/v1/predict?sets={junk}", body, {"Content-Type": JSON}), "any"),
        HttpCase("content-type", request("POST", "/v1/predict", body, {"Content-Type": rng.choice(
            ["text/plain", "application/xml", "image/png", "multipart/form-data", "application/json; charset=bogus",
             "*/*", "\x7f"])}), "any"),
        HttpCase("no-content-type", request("POST", "/v1/predict", body), "4xx"),
        HttpCase("unknown-path", request("GET", rng.choice(["/v2/predict", "/%ff", "/v1/predict/../x", "/" + "a" * 3000])),
                 "4xx"),
        HttpCase("wrong-method", request(rng.choice(["GET", "PUT", "DELETE", "PATCH"]), "/v1/predict"), "4xx"),
        HttpCase("reload-no-token", request("POST", "/v1/reload", headers={"Authorization": rng.choice(
            ["Bearer wrong", "Basic abc", "Bearer", "bearer  " + "x" * 300])}), "any"),
        HttpCase("declared-too-large", request("POST", "/v1/predict", b"{}", {"Content-Type": JSON},
                                               content_length=max_body + 1)[:-2], "4xx_or_close"),
        HttpCase("content-length-short", request("POST", "/v1/predict", body, {"Content-Type": JSON},
                                                 content_length=len(body) // 2), "4xx_or_close"),
        HttpCase("garbage-request-line", bytes(rng.getrandbits(8) for _ in range(64)) + b"\r\n\r\n", "4xx_or_close"),
        HttpCase("bad-header-line", b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "4xx_or_close"),
        HttpCase("bad-content-length", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                 "4xx_or_close"),
        HttpCase("bad-chunk", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", "4xx_or_close"),
        HttpCase("chunked-oversize", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", "4xx_or_close",
                 chunks=tuple([b"%x\r\n%s\r\n" % (65536, b"1" * 65536)] * (max_body // 65536 + 2) + [b"0\r\n\r\n"])),
    ]
    return cases


def slow_cases(rng: random.Random) -> list[HttpCase]:
    """Cases the server can only answer when its read timeout fires: they hold a connection that long."""
    return [
        HttpCase("content-length-lying", request("POST", "/v1/predict", b'{"inputs": [', {"Content-Type": JSON},
                                                 content_length=1000), "4xx_or_close", slow=True),
        HttpCase("partial-head", b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty", "4xx_or_close", slow=True),
    ]


def good_cases(shape, jpeg: bytes | None, rng: random.Random) -> list[HttpCase]:
    cases = [HttpCase("good-json", request("POST", "/v1/predict", json.dumps({"inputs": tensor(shape, 2, rng)}).encode(),
                                           {"Content-Type": JSON}), "200")]
    if jpeg is not None:
        cases.append(HttpCase("good-image", request("POST", "/v1/predict", multipart([("a.jpg", jpeg, "image/jpeg")]),
                                                    {"Content-Type": MULTIPART}), "200"))
    return cases


def ws_messages(shape, max_batch, jpeg: bytes, rng: random.Random) -> list[tuple[str, bytes | str, str]]:
    """(kind, message, expect) for /v1/stream: 'error' (an error message, socket open), 'ok' or 'close'
    (the server may close with a proper code: 1007 invalid UTF-8, 1009 too big)."""
    good = tensor(shape, 1, rng)
    bodies = [(k, body.decode("utf-8", "replace") if isinstance(body, bytes) else body, e)
              for k, body, e in bad_json_bodies(shape, max_batch, rng) if k not in ("json-invalid-utf8", "json-bom")]
    out: list[tuple[str, bytes | str, str]] = [(k, b, "error" if e == "4xx" else "any") for k, b, e in bodies]
    out += [
        ("ws-binary-garbage", bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 500))), "error"),
        ("ws-binary-truncated", jpeg[: rng.randrange(1, len(jpeg))], "error"),
        ("ws-binary-bomb", png(4, 4, rng, claim=(60_000, 60_000)), "error"),
        ("ws-not-object", rng.choice(["[]", "null", "1", '"x"', "true"]), "error"),
        ("ws-bad-id", json.dumps({"inputs": good, "id": "y" * 1000}), "error"),
        ("ws-good", json.dumps({"inputs": good, "id": rng.randrange(1000)}), "ok"),
        ("ws-invalid-utf8", b'{"inputs": "\xff"}', "close"),
    ]
    return out
