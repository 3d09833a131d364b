"""Reading fetched batches whose header names are not UTF-8 (aiokafka's own record format, no
broker): every record comes out, the bad name with its bytes kept; and the JSON nesting scan."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords

from app.kafka_headers import printable_header_name
from schemas.messages import parse_request
from schemas.nesting import MAX_NESTING, NestingTooDeep, nesting_depth
from tests.support.hostile import RawName
from workers.lenient_records import LenientRecords, undecodable_header_names

CODECS = {"none": 0, "gzip": 1}


def batch(codec: int) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(2, codec, 0, -1, -1, 0, 1 << 20)
    builder.append(0, timestamp=None, key=b"k0", value=b"v0", headers=[("ok", b"1")])
    builder.append(
        1,
        timestamp=None,
        key=b"k1",
        value=b"v1",
        headers=[(RawName(b"\xff\xfeevil"), b"2"), ("ok", None)],
    )
    builder.append(2, timestamp=None, key=b"k2", value=b"v2", headers=[])
    return bytes(builder.build())


@pytest.mark.parametrize("codec", CODECS.values(), ids=list(CODECS))
def test_a_batch_with_a_header_name_that_is_not_utf8_is_read_whole(codec: int) -> None:
    data = batch(codec)
    with pytest.raises(UnicodeDecodeError):  # what aiokafka does with it on its own
        list(MemoryRecords(data).next_batch())

    records = LenientRecords(data)
    read = records.next_batch()
    assert read.validate_crc() and read.next_offset == 3
    out = list(read)

    assert [(r.offset, r.key, r.value) for r in out] == [(0, b"k0", b"v0"), (1, b"k1", b"v1"), (2, b"k2", b"v2")]  # fmt: skip
    assert out[0].headers == [("ok", b"1")] and out[2].headers == []
    assert [undecodable_header_names(r.headers) for r in out] == [[], ["\\xff\\xfeevil"], []]
    [(name, value), ok] = out[1].headers
    assert name.encode("utf-8", "surrogateescape") == b"\xff\xfeevil" and value == b"2"
    assert ok == ("ok", None)
    assert not records.has_next()


def test_a_header_name_keeps_its_bytes_escaped_in_a_dead_letter() -> None:
    assert printable_header_name("plain") == "plain"
    assert printable_header_name(b"\xffa".decode("utf-8", "surrogateescape")) == "\\xffa"


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{\\"[["}', 1),  # brackets inside strings (and escaped quotes) do not count
        (b"[" * 1000 + b"]" * 1000, MAX_NESTING + 1),  # the scan stops past the bound
        (b"not json at all", 0),
    ],
)
def test_nesting_depth_counts_brackets_outside_strings(raw: bytes, depth: int) -> None:
    assert nesting_depth(raw) == depth


def test_a_request_nested_deeper_than_the_bound_is_refused_before_parsing() -> None:
    with pytest.raises(NestingTooDeep):
        parse_request(
            b'{"type": "job.cancel", "x": ' + b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"}"
        )
