"""No record wedges a claim worker (real `qm run` processes, real broker and database).

A hostile producer writes records our parser or the client library cannot read: JSON nested
1,000 deep (a parser recursing on it fails, and so did building its dead letter), a header name
that is not UTF-8 (aiokafka fails decoding the fetched batch). Each is dead-lettered, the valid
requests after it are answered promptly, the group's committed offsets reach the end, and a worker
stopped with such records about stops at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import pytest

from app.dlt import header
from app.settings import Settings
from tests.support.hostile import (
    NESTED,
    RawName,
    Seen,
    Sent,
    produce,
    read_until,
    start_body,
    valid_start,
)
from tests.support.kafka import lag_returns_to_zero
from tests.support.processes import QmProcess, serving
from tests.support.waiting import eventually_sync

pytestmark = pytest.mark.timeout(240)

ANSWERED_WITHIN = 60.0  # seconds for every valid request after the hostile records


def test_records_nested_1000_deep_are_dead_lettered_and_the_requests_after_them_answered(
    topics: Settings,
) -> None:
    partitions = topics.topic_partitions
    # three on partition 0 (more than the worker's transactions, which they once all held), one
    # on every other partition, then 40 valid requests spread over every partition
    nested = [Sent(0, b"nested", NESTED) for _ in range(3)]
    nested += [Sent(p, b"nested", NESTED) for p in range(1, partitions)]
    valid = [
        valid_start(i % partitions, f"after-nested-{i}-{uuid.uuid4().hex[:6]}") for i in range(40)
    ]
    wanted = {header(sent.headers, "correlation_id") for sent in valid}

    def done(seen: Seen) -> bool:
        return wanted <= seen.replies.keys() and len(seen.dead) >= len(nested)

    with serving(topics, capacity=50, n_accounts=50):
        asyncio.run(produce(topics, nested + valid))
        started = time.monotonic()
        seen = asyncio.run(read_until(topics, done, ANSWERED_WITHIN))
        assert time.monotonic() - started < ANSWERED_WITHIN
        asyncio.run(lag_returns_to_zero(topics, timeout=30))

    assert {seen.replies[c]["type"] for c in wanted} == {"job.granted"}
    assert len(seen.dead) == len(nested)
    for key, value, headers in seen.dead:
        assert key == b"nested" and value == NESTED  # the record as it came
        assert header(headers, "qm.dlt.error_class") == "schemas.nesting.NestingTooDeep"
        assert "nested deeper than 32" in (header(headers, "qm.dlt.error_message") or "")


def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_its_partition_reads_on(
    topics: Settings,
) -> None:
    bad_body = start_body(f"bad-header-{uuid.uuid4().hex[:6]}")
    bad = Sent(
        0,
        b"bad-header",
        json.dumps(bad_body).encode(),
        [
            (RawName(b"\xff\xfeevil"), b"value"),
            ("correlation_id", bad_body["request_id"].encode()),
        ],
        raw_batch=True,
    )
    valid = [valid_start(0, f"after-header-{i}-{uuid.uuid4().hex[:6]}") for i in range(10)]
    wanted = {header(sent.headers, "correlation_id") for sent in valid}
    wanted.add(bad_body["request_id"])

    def done(seen: Seen) -> bool:
        return wanted <= seen.replies.keys() and len(seen.dead) >= 1

    with serving(topics, capacity=20, n_accounts=20):
        asyncio.run(produce(topics, [valid[0], bad, *valid[1:]]))
        seen = asyncio.run(read_until(topics, done, ANSWERED_WITHIN))
        asyncio.run(lag_returns_to_zero(topics, timeout=30))

    answer = seen.replies.pop(bad_body["request_id"])
    assert answer["type"] == "request.invalid"
    assert "header names that are not UTF-8: \\xff\\xfeevil" in answer["error"]
    assert {reply["type"] for reply in seen.replies.values()} == {"job.granted"}
    [(key, value, headers)] = seen.dead
    assert key == b"bad-header" and value == bad.value
    assert ("\\xff\\xfeevil", b"value") in headers  # its name escaped, its value as it came
    assert header(headers, "qm.dlt.original_partition") == "0"


def test_a_worker_stopped_with_nested_records_in_flight_stops_at_once(topics: Settings) -> None:
    asyncio.run(produce(topics, [Sent(p, b"nested", NESTED) for p in (0, 0, 0, 1)]))
    with QmProcess(topics, "worker") as worker:
        # the worker has read them: the old code retried them for ever, the new dead-letters them
        eventually_sync(
            lambda: (
                "lone_run_failed" in worker.output() or "request_dead_lettered" in worker.output()
            ),
            timeout=60,
        )
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = worker.wait(timeout=40)  # raises TimeoutExpired when drain() hangs
        assert code == 0
        assert time.monotonic() - stopped < 30
