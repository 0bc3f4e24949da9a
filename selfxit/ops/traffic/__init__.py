"""The traffic log: append-only shards of CRC-framed records, safe under crashes and many writers.

Layout of a log location (a local folder, or any fsspec URL such as ``memory://`` or ``s3://``)::

    <start>-<host>-<pid>-<random>-<seq>.tlog   a shard: records appended by ONE writer, never by two
    <same name>.idx                            its index (JSON: records, bytes, oldest, newest, sorted),
                                               written once the shard is sealed and never appended again

Modules: :mod:`.codec` (the record and its frame), :mod:`.layout` (names, indexes, the live-shard
lock), :mod:`.writer` (append, flush, seal; object stores), :mod:`.reader` (list, scan, read, count),
:mod:`.retention` (prune), :mod:`.log` (:class:`TrafficLog`, all three together) and
:mod:`.inputs` (records back to model inputs).
"""
from selfxit.ops.traffic.codec import (
    FORMAT_VERSION,
    MAGIC,
    SOURCES,
    TrafficLogError,
    TrafficRecord,
    decode_frame,
    decode_record,
    encode_record,
)
from selfxit.ops.traffic.inputs import record_input, record_inputs
from selfxit.ops.traffic.layout import INDEX_SUFFIX, SHARD_SUFFIX
from selfxit.ops.traffic.log import TrafficLog

__all__ = ["TrafficLog", "TrafficRecord", "TrafficLogError", "encode_record", "decode_record", "decode_frame",
           "record_input", "record_inputs", "SOURCES", "SHARD_SUFFIX", "INDEX_SUFFIX", "MAGIC", "FORMAT_VERSION"]
