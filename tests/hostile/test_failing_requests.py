"""A request that cannot be processed, or whose dead letter cannot be built, settles all the same
(the claim worker's processing, against the real database).

- JSON nested 1,000 deep is refused before parsing and dead-lettered (its dead letter once raised
  ``RecursionError``, outside the handling, and the lone run went again for ever).
- A request failing unexpectedly every time is dead-lettered after its attempts and answered
  ``request.failed`` with the error's class alone; the requests after it go on.
- A dead letter that cannot be built falls back to the raw record and a minimal header set.
- A lone run that raises every time is dead-lettered raw after its attempts, and a worker that
  stops meanwhile does not wait for it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from tests.integration.test_failure_policy import dead_letters
from tests.support.hostile import NESTED
from tests.support.leasing import cancel, make_site, replies, start
from workers import dead_letters as letter_building
from workers import requests as requests_module
from workers.requests import Incoming, RequestProcessor

SETTLES_WITHIN = 20.0  # seconds: a record that does not settle by then is wedged
SECRET_MESSAGE = "the-failure-message-CANARY"


@pytest.fixture
def processor(settings: Settings, engine: AsyncEngine) -> RequestProcessor:
    fast = settings.model_copy(update={"unexpected_retry_max_seconds": 0.01})
    return RequestProcessor(fast, Database(engine))


def nested(settings: Settings, offset: int) -> Incoming:
    return Incoming(settings.topic("requests"), 0, offset, 0, b"nested", NESTED, [])


async def test_records_nested_1000_deep_are_dead_lettered_as_bad_input(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    async with asyncio.timeout(SETTLES_WITHIN):
        outcomes = await asyncio.gather(*(processor.process(nested(settings, i)) for i in range(3)))
        after = await processor.process(start(settings, "after-nested", wait_seconds=0))

    assert outcomes == ["dead_lettered"] * 3
    assert after == "replied"
    letters = await dead_letters(engine, settings)
    assert [bytes(letter["payload"]) for letter in letters] == [NESTED] * 3
    assert {letter["headers"]["qm.dlt.error_class"] for letter in letters} == {
        b"schemas.nesting.NestingTooDeep"
    }
    [granted] = await replies(engine, settings, "after-nested")
    assert granted["type"] == "job.granted"


async def test_a_request_failing_every_time_is_answered_request_failed_and_dead_lettered(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_site(engine, settings)
    calls = 0

    async def broken(*_: object) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise LookupError(SECRET_MESSAGE)

    monkeypatch.setitem(requests_module.HANDLERS, "job.cancel", broken)
    failing = cancel(settings, "failing-job")
    async with asyncio.timeout(SETTLES_WITHIN):
        assert await processor.process(failing) == "dead_lettered"
        assert await processor.process(start(settings, "later-job", wait_seconds=0)) == "replied"

    assert calls >= settings.unexpected_error_attempts
    [failed] = await replies(engine, settings, "failing-job")
    assert failed == {
        "type": "request.failed",
        "v": 1,
        "request_id": json.loads(failing.value or b"")["request_id"],
        "job_id": "failing-job",
        "error_class": "LookupError",
    }
    [letter] = await dead_letters(engine, settings)
    assert letter["headers"]["qm.dlt.error_class"] == b"builtins.LookupError"
    assert letter["headers"]["qm.dlt.attempts"] == str(settings.unexpected_error_attempts).encode()
    [later] = await replies(engine, settings, "later-job")
    assert later["type"] == "job.granted"
    assert SECRET_MESSAGE not in json.dumps(await replies(engine, settings))


async def test_a_dead_letter_that_cannot_be_built_falls_back_to_the_raw_record(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def recursing(_: bytes) -> bytes:
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    monkeypatch.setattr(letter_building, "without_secrets", recursing)
    record = Incoming(settings.topic("requests"), 0, 41, 1234, b"k", b'{"type": 1}', [("a", b"b")])
    async with asyncio.timeout(SETTLES_WITHIN):
        assert await processor.process(record) == "dead_lettered"

    [letter] = await dead_letters(engine, settings)
    assert letter["key"] == b"k" and bytes(letter["payload"]) == b'{"type": 1}'
    assert {
        name: value for name, value in letter["headers"].items() if name != "qm.message_id"
    } == {
        "qm.dlt.original_topic": settings.topic("requests").encode(),
        "qm.dlt.original_partition": b"0",
        "qm.dlt.original_offset": b"41",
        "qm.dlt.original_timestamp": b"1234",
        "qm.dlt.error_class": b"pydantic_core._pydantic_core.ValidationError",
        "qm.dlt.attempts": b"1",
    }


async def test_a_lone_run_raising_every_time_is_dead_lettered_raw_after_its_attempts(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = 0

    async def raising(_: Incoming) -> str:
        nonlocal runs
        runs += 1
        raise RecursionError("the handling itself failed")

    monkeypatch.setattr(processor, "_process", raising)
    async with asyncio.timeout(SETTLES_WITHIN):
        assert await processor.process(nested(settings, 7)) == "dead_lettered"

    assert runs == settings.unexpected_error_attempts
    [letter] = await dead_letters(engine, settings)
    assert bytes(letter["payload"]) == NESTED
    assert letter["headers"]["qm.dlt.error_class"] == b"builtins.RecursionError"
    assert letter["headers"]["qm.dlt.attempts"] == str(settings.unexpected_error_attempts).encode()


async def test_a_stopping_worker_does_not_wait_for_a_lone_run_that_keeps_failing(
    processor: RequestProcessor, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = asyncio.Event()

    async def raising(*_: object) -> str:
        tried.set()
        raise RecursionError("fails every time, its raw dead letter too")

    monkeypatch.setattr(processor, "_process", raising)
    monkeypatch.setattr(processor, "_dead_letter_raw", raising, raising=False)
    outcome = processor.enqueue(nested(settings, 9))
    async with asyncio.timeout(SETTLES_WITHIN):
        await tried.wait()

    processor.close()
    async with asyncio.timeout(5):  # drain() once waited for it for ever
        await processor.drain()
    assert outcome.cancelled()  # no outcome: its record is read again by the next owner
