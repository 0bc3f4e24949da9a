"""Crafted traffic records: a frame whose CRC is valid but whose header lies (a shape larger than its data, a
missing key, a wrong type, deeply nested JSON, ...) counts as corrupt, is skipped with a warning naming the shard
and what was wrong, and never stops a reader."""
import copy
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from selfxit.ops.traffic import TrafficLog, TrafficRecord, decode_frame, decode_record, encode_record
from selfxit.ops.traffic.codec import check_header

torch.set_num_threads(1)
PREFIX = struct.Struct("<4sIII")


def frame(header: bytes, body: bytes) -> bytes:
    """A frame with a valid CRC over whatever header and body it is given."""
    crc = zlib.crc32(body, zlib.crc32(header, zlib.crc32(struct.pack("<II", len(header), len(body)))))
    return PREFIX.pack(b"SXTR", len(header), len(body), crc) + header + body


def good(i: int) -> TrafficRecord:
    return TrafficRecord(timestamp=1.7e9 + i, input=torch.arange(12, dtype=torch.float32).reshape(3, 2, 2) + i,
                         encoded=b"img%d" % i, content_type="image/png", backbone_probs=np.full(4, 0.25, np.float32),
                         exit="final", prediction=i, meta={"i": i})


def split(raw: bytes) -> tuple[dict, bytes]:
    _, n_head, n_body, _ = PREFIX.unpack(raw[:PREFIX.size])
    return json.loads(raw[PREFIX.size:PREFIX.size + n_head]), raw[PREFIX.size + n_head:]


BASE_HEAD, BASE_BODY = split(encode_record(good(1)))


def shard_with(tmp_path, middle: bytes):
    """A log folder holding one shard: record 0, the crafted frame, record 2."""
    name = "20240101T000000-crafted-1-abcd0123-00001.tlog"
    (tmp_path / name).write_bytes(encode_record(good(0)) + middle + encode_record(good(2)))
    return tmp_path, name


def read_all(location):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = TrafficLog(location)
        records = list(log.read())
        count, stats = log.count(), log.stats()
    return records, count, stats, [str(w.message) for w in caught]


@pytest.mark.parametrize("change, match", [
    (lambda h: h["tensors"]["input"].update(shape=[3, 64, 64]), "takes 49152 bytes but nbytes says 48"),
    (lambda h: h["tensors"]["input"].update(shape=[3, 64, 64], nbytes=49152), "body holds"),
    (lambda h: h.pop("tensors"), "lacks tensors"),
    (lambda h: h["tensors"]["input"].update(dtype="qint8"), "dtype 'qint8'; allowed"),
    (lambda h: h.update(t=float("nan")), "not a finite number"),
    (lambda h: h.update(v=2), "format version 2"),
    (lambda h: h["tensors"].update(backbone_probs={"dtype": "bfloat16", "shape": [8], "nbytes": 16}),
     "backbone_probs must be float32"),
    (lambda h: h["tensors"]["input"].update(shape=[-1, 16]), "at most 8 integers in 0..2147483647"),
])
def test_a_lying_header_is_skipped_with_a_warning_that_says_what_was_wrong(tmp_path, change, match):
    head = copy.deepcopy(BASE_HEAD)
    change(head)
    crafted = frame(json.dumps(head).encode(), BASE_BODY)
    location, name = shard_with(tmp_path, crafted)
    records, count, stats, messages = read_all(location)
    assert [r.meta["i"] for r in records] == [0, 2] and count == stats["records"] == 2
    assert len(messages) == 1 and name in messages[0] and match in messages[0], messages
    with pytest.raises(ValueError, match=match):
        decode_frame(crafted)
    with pytest.raises(ValueError, match="inconsistent traffic record header"):
        decode_record(head, BASE_BODY)


def test_deeply_nested_or_non_json_headers_are_skipped(tmp_path):
    for i, header in enumerate([b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe not json", b"[1, 2]", b"{}"]):
        location = tmp_path / str(i)
        location.mkdir()
        records, _, _, messages = read_all(shard_with(location, frame(header, b"body"))[0])
        assert [r.meta["i"] for r in records] == [0, 2] and len(messages) == 1, (header[:20], messages)


def test_an_index_that_lies_is_ignored_and_the_shard_scanned(tmp_path):
    location, name = shard_with(tmp_path, b"")
    for bad in ['{"records": "many", "oldest": 1, "newest": 2, "sorted": true}',
                '{"records": 2, "oldest": null, "newest": 2, "sorted": true}', "[1]", '{"records": 2}']:
        (tmp_path / name.replace(".tlog", ".idx")).write_text(bad)
        records, count, stats, messages = read_all(location)
        assert [r.meta["i"] for r in records] == [0, 2] and count == stats["records"] == 2 and not messages


def test_a_writer_refuses_an_input_dtype_the_reader_could_not_rebuild():
    record = good(0)
    record.input = record.input.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="dtypes bool, uint8.*got torch.float8_e4m3fn"):
        encode_record(record)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=12)
KEYS = sorted(BASE_HEAD) + ["extra"]
SPEC_FIELDS = ["dtype", "shape", "nbytes", "other"]


@st.composite
def mutated_headers(draw):
    """The header of a real record with 1-4 fields deleted or replaced by arbitrary JSON (tensor specs included)."""
    head = copy.deepcopy(BASE_HEAD)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["drop", "set", "tensor", "shape"]))
        if kind == "drop" and head:
            head.pop(draw(st.sampled_from(sorted(head))))
        elif kind == "set":
            head[draw(st.sampled_from(KEYS))] = draw(json_values)
        elif isinstance(head.get("tensors"), dict):
            name = draw(st.sampled_from(["input", "backbone_probs", "other"]))
            spec = head["tensors"].setdefault(name, {})
            if not isinstance(spec, dict):
                continue
            if kind == "shape":
                spec["shape"] = draw(st.lists(st.integers(-3, 2**40), max_size=10))
                spec["nbytes"] = draw(st.integers(0, 2**64) | st.just(BASE_BODY.__len__()))
            else:
                spec[draw(st.sampled_from(SPEC_FIELDS))] = draw(json_values | st.sampled_from(
                    ["float32", "bfloat16", "bool", "qint8", "float8_e4m3fn", "__class__", "Tensor"]))
    return json.dumps(head).encode()


headers = mutated_headers() | json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)
bodies = st.just(BASE_BODY) | st.binary(max_size=300) | st.integers(0, 400).map(lambda n: bytes(n))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(header=headers, body=bodies)
@example(header=json.dumps({**BASE_HEAD, "tensors": {}}).encode(), body=BASE_BODY)
@example(header=json.dumps({**BASE_HEAD, "tensors": {"input": {"dtype": [3], "shape": [1], "nbytes": 4}}}).encode(),
         body=BASE_BODY)
@example(header=json.dumps({**BASE_HEAD, "source": [], "meta": [1]}).encode(), body=BASE_BODY)
@example(header=json.dumps({k: v for k, v in BASE_HEAD.items() if k != "tensors"}).encode(), body=BASE_BODY)
def test_hypothesis_crafted_headers_never_stop_a_reader(tmp_path_factory, header, body):
    crafted = frame(header, body)
    location, name = shard_with(tmp_path_factory.mktemp("crafted"), crafted)
    records, count, stats, messages = read_all(location)  # must not raise, whatever the header says
    try:
        head = json.loads(header)
    except (ValueError, RecursionError):
        head = None
    consistent = head is not None and check_header(head, len(body)) is None
    assert [r.meta["i"] for r in records if r.meta in ({"i": 0}, {"i": 2})] == [0, 2]
    if consistent:  # a well-formed record after all: returned, decoded like any other
        assert len(records) == count == 3 and not messages
        assert decode_frame(crafted).timestamp == head["t"]
    else:
        assert len(records) == count == stats["records"] == 2
        assert len(messages) == 1 and name in messages[0] and "does not match its header" in messages[0]
        with pytest.raises(ValueError):
            decode_frame(crafted)
