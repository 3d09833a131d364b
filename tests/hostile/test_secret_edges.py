"""The edges of bad input a hostile or broken collector reaches (the claim worker's processing,
against the real database): what parses least still keeps its secrets and settles at once.

- A follow-up too deep to parse is dead-lettered as bad input, and its dead letter, parsed or
  raw, never holds the lease's secret.
- A sealed session state nested deeper than any storage state is bad input (``request.invalid``),
  not an unexpected failure retried until ``request.failed``.
- Values PostgreSQL cannot take (NaN in ``meta``, a time with no UTC form) are refused at the
  schema.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.sealing import load_public_key, seal
from app.settings import Settings
from schemas.messages import CaptureSubmit, seal_context
from tests.integration.test_failure_policy import dead_letters
from tests.support.leasing import held_lease, make_site, replies, request, start
from workers import dead_letters as letter_building
from workers.requests import RequestProcessor

SETTLES_WITHIN = 20.0


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


def capture(job_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "capture_id": f"cap-{job_id}",
        "url": "https://board.example.com/a",
        "storage_uri": "s3://bucket/a",
        "sha256": "0" * 64,
        "content_type": "text/html",
        "size": 1,
        "captured_at": "2026-01-01T00:00:00Z",
        **fields,
    }


@pytest.mark.parametrize("raw_letter", [False, True], ids=["parsed", "raw"])
async def test_a_follow_up_too_deep_to_parse_is_dead_lettered_without_its_lease_secret(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    raw_letter: bool,
) -> None:
    await make_site(engine, settings)
    assert await processor.process(start(settings, "deep-job")) == "replied"
    lease = await held_lease(engine, settings, "deep-job")
    if raw_letter:  # the full letter cannot be built: the raw one is written instead

        def failing(_: bytes) -> bytes:
            raise RecursionError("the letter cannot be built")

        monkeypatch.setattr(letter_building, "without_secrets", failing)
    submit = request(
        settings, "capture.submit", "deep-job", **lease, **capture("deep-job", meta=deep(40))
    )
    async with asyncio.timeout(SETTLES_WITHIN):
        assert await processor.process(submit) == "dead_lettered"

    [letter] = await dead_letters(engine, settings)
    assert letter["headers"]["qm.dlt.error_class"] == b"schemas.nesting.NestingTooDeep"
    assert lease["lease_secret"].encode() not in bytes(letter["payload"])
    assert b'"lease_secret": "[withheld]"' in bytes(letter["payload"])


async def test_a_sealed_session_state_nested_too_deep_is_bad_input(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    assert await processor.process(start(settings, "upload-job")) == "replied"
    lease = await held_lease(engine, settings, "upload-job")
    [grant] = [
        r for r in await replies(engine, settings, "upload-job") if r["type"] == "job.granted"
    ]
    depth = 5_000  # past what a parser's stack survives (its recursion limit is 1,000)
    sealed = seal(
        load_public_key(grant["upload_key"]),
        b"[" * depth + b"]" * depth,
        seal_context("session.upload", "upload-job"),
    )
    upload = request(settings, "session.upload", "upload-job", **lease, storage_state=sealed)
    async with asyncio.timeout(SETTLES_WITHIN):
        assert await processor.process(upload) == "replied"

    answer = (await replies(engine, settings, "upload-job"))[-1]
    assert answer["type"] == "request.invalid"
    assert await dead_letters(engine, settings) == []  # final at once: not retried, not failed


@pytest.mark.parametrize(
    "fields",
    [
        {"meta": {"ratio": float("nan")}},
        {"meta": {"ratio": float("inf")}},
        {"meta": deep(31)},
        {"captured_at": "0001-01-01T00:00:00+05:00"},
    ],
    ids=["nan", "infinity", "deep-meta", "no-utc-form"],
)
def test_values_postgresql_cannot_take_are_refused_at_the_schema(fields: dict[str, Any]) -> None:
    body = {"type": "capture.submit", "v": 1, "request_id": "0190a6c2-7b3e-7000-8000-000000000001",
            "job_id": "j", "lease_token": 1, "lease_secret": "s" * 43, **capture("j")}  # fmt: skip
    assert CaptureSubmit.model_validate(body).size == 1
    with pytest.raises(ValidationError):
        CaptureSubmit.model_validate({**body, **fields})
