"""Fuzzing the claim worker with malformed requests interleaved with valid ones (real processes).

The worker must never stop; every bad record lands in the dead-letter topic with a reason; every valid
request is answered; the consumer group's lag returns to zero.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.dlt import header
from app.kafka import client_options, producer_options
from app.settings import Settings
from schemas.messages import parse_request
from tests.support.kafka import lag_returns_to_zero
from tests.support.leasing import COLLECTOR_PUBLIC_KEY
from tests.support.processes import serving

pytestmark = pytest.mark.chaos

MAX_BYTES = 4096
PER_EXAMPLE = 500
EXAMPLES = 4  # 2,000 records in all, about two in three malformed

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


def valid_body(kind: str, job_id: str) -> dict[str, Any]:
    base = {"v": 1, "request_id": str(uuid.uuid4()), "job_id": job_id}
    if kind == "start":
        return {
            **base,
            "type": "job.start",
            "site": "board",
            "collector": "fuzz",
            "wait_seconds": 0,
            "public_key": COLLECTOR_PUBLIC_KEY,
        }
    return {**base, "type": "job.cancel"}


def as_record(body: dict[str, Any] | bytes, *, correlate: bool = True) -> Record:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request_id = body.get("request_id") if isinstance(body, dict) else None
    headers = (
        [("correlation_id", str(request_id).encode())]
        if correlate and isinstance(request_id, str)
        else []
    )
    return (b"fuzz", raw, headers)


junk = st.one_of(st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(), st.text(max_size=20),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip


@st.composite
def malformed(draw: st.DrawFn) -> Record:
    body = valid_body(draw(st.sampled_from(["start", "cancel"])), f"bad-{uuid.uuid4().hex[:8]}")
    shape = draw(
        st.sampled_from(
            ["bytes", "truncated", "wrong_type", "type", "version", "huge", "extra", "no_headers"]
        )
    )
    if shape == "bytes":
        return as_record(draw(st.binary(max_size=200)))
    if shape == "truncated":
        raw = json.dumps(body).encode()
        return as_record(raw[: draw(st.integers(0, len(raw) - 1))])
    if shape == "wrong_type":
        body[draw(st.sampled_from(sorted(body)))] = draw(junk)
    elif shape == "type":
        body["type"] = draw(st.text(max_size=30))
    elif shape == "version":
        body["v"] = draw(st.integers().filter(lambda v: v != 1))
    elif shape == "huge":
        body["collector"] = "x" * draw(st.integers(MAX_BYTES, 3 * MAX_BYTES))
    elif shape == "extra":
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in body))] = draw(junk)
    return as_record(body, correlate=shape != "no_headers")


@st.composite
def valid(draw: st.DrawFn) -> Record:
    return as_record(
        valid_body(draw(st.sampled_from(["start", "cancel"])), f"ok-{uuid.uuid4().hex[:8]}")
    )


def is_valid(raw: bytes) -> bool:
    """The contract's own judgement of a record (the oracle the worker must agree with)."""
    if len(raw) > MAX_BYTES:
        return False
    try:
        parse_request(raw)
    except ValueError:
        return False
    return True


@pytest.fixture
def server(topics: Settings) -> Iterator[Settings]:
    """The real processes, started once for every Hypothesis example of the test."""
    settings = topics.model_copy(update={"max_request_bytes": MAX_BYTES})
    with serving(settings, capacity=50, n_accounts=50):
        yield settings


@pytest.mark.timeout(600)
@hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    records=st.lists(
        st.one_of(malformed(), malformed(), valid()), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE
    )
)
def test_bad_input_never_stops_the_worker_and_loses_nothing(
    server: Settings, records: list[Record]
) -> None:
    asyncio.run(asyncio.wait_for(exercise(server, records), 140))


async def exercise(settings: Settings, records: list[Record]) -> None:
    batch = uuid.uuid4().hex.encode()
    tagged = [(key, value, [*headers, ("fuzz-batch", batch)]) for key, value, headers in records]
    expect_dead = sum(not is_valid(value) for _, value, _ in tagged)
    expect_answered = {json.loads(value)["request_id"] for _, value, _ in tagged if is_valid(value)}
    producer = AIOKafkaProducer(**producer_options(settings), max_request_size=1024 * 1024)
    await producer.start()
    try:
        sends = [await producer.send(settings.topic("requests"), value, key=key, headers=headers)
                 for key, value, headers in tagged]  # fmt: skip
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    dead: list[list[tuple[str, bytes]]] = []
    answered: set[str] = set()
    consumer = AIOKafkaConsumer(
        settings.topic("requests.dlt"), settings.topic("replies"), **client_options(settings),
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        while len(dead) < expect_dead or not expect_answered <= answered:
            for batch_records in (await consumer.getmany(timeout_ms=500)).values():
                for record in batch_records:
                    headers = list(record.headers)
                    if (
                        record.topic.endswith(".dlt")
                        and header(headers, "fuzz-batch") == batch.decode()
                    ):
                        dead.append(headers)
                    elif correlation := header(headers, "correlation_id"):
                        answered.add(correlation)
    finally:
        await consumer.stop()
    assert len(dead) == expect_dead
    assert all(
        header(h, "qm.dlt.error_message") and header(h, "qm.dlt.original_offset") for h in dead
    )
    assert {header(h, "qm.dlt.error_class") for h in dead} <= {"pydantic_core._pydantic_core.ValidationError",
                                                                "app.errors.InvalidMessage"}  # fmt: skip
    await lag_returns_to_zero(settings)
