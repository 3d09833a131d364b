"""What the claim worker does with a request that fails, against a real PostgreSQL.

- Bad input is final: a dead letter and a ``request.invalid`` reply that keeps the field's path
  and echoes nothing secret.
- An unexpected error is retried, then dead-lettered and answered ``request.failed`` with the
  error's class alone (docs/dead-letters.md).
- A null value stays null in its dead letter; a database error is described without its SQL.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import describe
from app.settings import Settings
from app.store import Database
from app.store.outbox import decode_headers
from tests.support.leasing import cancel, make_site, replies, scalar, start
from workers import requests as requests_module
from workers.requests import Incoming, RequestProcessor

SECRET = "hunter2-CANARY"


@pytest.fixture
def processor(settings: Settings, engine: AsyncEngine) -> RequestProcessor:
    fast = settings.model_copy(update={"unexpected_retry_max_seconds": 0.01})
    return RequestProcessor(fast, Database(engine))


async def dead_letters(engine: AsyncEngine, settings: Settings) -> list[dict[str, Any]]:
    """Dead letters written to the outbox: key, payload and headers (decoded)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key, payload, headers FROM outbox WHERE topic = :t ORDER BY id"),
            {"t": settings.topic("requests.dlt")},
        )
        return [
            {
                "key": key,
                "payload": payload,
                "headers": dict(decode_headers(headers)),
            }
            for key, payload, headers in rows
        ]


async def test_bad_input_gets_request_invalid_with_the_field_path_and_no_secret(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    record = start(settings, "j1", password=SECRET)

    assert await processor.process(record) == "dead_lettered"

    [reply] = await replies(engine, settings)
    assert reply["type"] == "request.invalid"
    assert "job.start.password: Extra inputs are not permitted" in reply["error"]
    [letter] = await dead_letters(engine, settings)
    assert letter["headers"]["qm.dlt.error_message"] == reply["error"].encode()
    assert SECRET not in json.dumps(reply)


async def test_an_unexpected_error_is_retried_then_dead_lettered_and_answered_request_failed(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0

    async def broken(*_: object) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise KeyError("boom")

    monkeypatch.setitem(requests_module.HANDLERS, "job.cancel", broken)

    assert await processor.process(cancel(settings, "j2")) == "dead_lettered"

    # its own tries (plus one in a shared transaction, when the group commit is on)
    assert calls >= settings.unexpected_error_attempts
    [failed] = await replies(engine, settings)  # its class, no message: "boom" stays in the logs
    assert (failed["type"], failed["error_class"], "boom" in str(failed)) == (
        "request.failed",
        "KeyError",
        False,
    )
    [letter] = await dead_letters(engine, settings)
    assert letter["headers"]["qm.dlt.error_class"] == b"builtins.KeyError"
    assert letter["headers"]["qm.dlt.attempts"] == str(settings.unexpected_error_attempts).encode()


async def test_a_null_value_stays_null_and_headers_stay_as_they_came(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("dup", b"1"),
        ("dup", b"2"),
        ("bin", b"\xff\xfe"),
        ("nul\x00name", None),
    ]
    record = Incoming(settings.topic("requests"), 0, 7, 0, None, None, headers)

    assert await processor.process(record) == "dead_lettered"

    [letter] = await dead_letters(engine, settings)
    assert letter["key"] is None and letter["payload"] is None
    async with engine.connect() as conn:
        names = (
            await conn.execute(
                text("SELECT headers FROM outbox WHERE topic = :t"),
                {"t": settings.topic("requests.dlt")},
            )
        ).scalar_one()
    assert decode_headers(names)[1:5] == headers  # after the outbox's own qm.message_id


async def test_a_database_error_is_described_without_sql_or_parameters(
    engine: AsyncEngine,
) -> None:
    marker = "not-a-digest-" + uuid.uuid4().hex
    with pytest.raises(DBAPIError) as caught:
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO dlt_values (id, sha256, value) VALUES (:id, :sha, :v)"),
                {"id": uuid.uuid4(), "sha": marker, "v": b"x"},
            )

    described = describe(caught.value)
    assert "SQLSTATE 23514" in described
    assert "dlt_values" in described
    assert "INSERT" not in described and marker not in described


async def test_a_correlation_id_with_a_nul_character_is_bad_input_answered_at_once(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    # the job keeps its start's correlation id in a text column, which holds no NUL: refused
    # as bad input with a reason, not failed in the database and dead-lettered unanswered
    await make_site(engine, settings)
    base = start(settings, "j-nul")
    record = dataclasses.replace(base, headers=[("correlation_id", b"corr\x00elation")])

    assert await processor.process(record) == "dead_lettered"

    [reply] = await replies(engine, settings)
    assert reply["type"] == "request.invalid" and "NUL" in reply["error"]
    [letter] = await dead_letters(engine, settings)
    assert letter["headers"]["qm.dlt.attempts"] == b"1"
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0
