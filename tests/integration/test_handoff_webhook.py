"""The webhook target through the real handoff worker code against a real HTTP server on loopback:
retries with backoff on the database clock, a refusal that fails at once, a receiver that never
answers."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.undispatched_captures import UndispatchedCaptures
from tests.support.captures import (
    capture_row,
    outbox_payloads,
    relayed,
    running_job,
    submit,
    webhook,
)
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor


async def test_a_webhook_failing_twice_is_retried_after_its_backoff_then_handed_off(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(update={"handoff_backoff_seconds": 5.0})
    worker = HandoffWorker(settings, Database(engine))
    sweep = UndispatchedCaptures(settings, Database(engine))
    with webhook(500, 500, 200) as hook:
        token = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", token, "cap-1"))
        assert await worker.hand_off("cap-1") == "retrying"
        first = await capture_row(engine, "cap-1")
        assert first["status"] == "RECEIVED" and first["attempts"] == 1
        assert first["next_attempt_at"] - first["updated_at"] == timedelta(seconds=5)
        assert first["last_error"] == "webhook: webhook answered HTTP 500"
        # before its backoff is over nothing tries again: not a stale record, not the reaper
        assert await worker.hand_off("cap-1") == "skipped"
        assert (await sweep.run_once()).changed == []
        await relayed(engine, settings.topic("captures"))  # its first record is long gone
        due = first["next_attempt_at"]
        assert (await sweep.run_once(due)).changed == ["cap-1"]
        assert await worker.hand_off("cap-1", now=due) == "retrying"
        second = await capture_row(engine, "cap-1")
        assert second["attempts"] == 2
        assert second["next_attempt_at"] - due == timedelta(seconds=10)  # doubled
        assert await worker.hand_off("cap-1", now=second["next_attempt_at"]) == "handed_off"
    assert [hit.idempotency_key for hit in hook.hits] == ["cap-1"] * 3
    assert [hit.body["attempt"] for hit in hook.hits] == [1, 2, 3]
    assert (await capture_row(engine, "cap-1"))["status"] == "HANDED_OFF"
    ready = await outbox_payloads(engine, settings.topic("captures.ready"))
    assert [r["capture_id"] for r in ready] == ["cap-1"]
    kinds = [e["type"] for e in await outbox_payloads(engine, settings.topic("events"))]
    assert kinds.count("capture.retrying") == 2 and kinds[-1] == "capture.handed_off"


async def test_a_webhook_refusing_with_400_fails_the_capture_at_once_with_its_reason(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    worker = HandoffWorker(settings, Database(engine))
    with webhook(400) as hook:
        token = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", token, "cap-1"))
        assert await worker.hand_off("cap-1") == "failed"
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "FAILED" and row["attempts"] == 1
    assert row["last_error"] == "webhook: webhook answered HTTP 400"
    assert len(hook.hits) == 1
    assert await outbox_payloads(engine, settings.topic("captures.ready")) == []
    [dead] = await outbox_payloads(engine, settings.topic("captures.dlt"))
    assert dead["capture_id"] == "cap-1"


async def test_a_webhook_that_never_answers_times_out_retries_and_stops_at_the_cap(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(
        update={"webhook_timeout_seconds": 0.3, "handoff_max_attempts": 3}
    )
    worker = HandoffWorker(settings, Database(engine))
    with webhook(0) as hook:
        token = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", token, "cap-1"))
        now = None
        outcomes = []
        for _ in range(3):
            outcomes.append(await worker.hand_off("cap-1", now=now))
            now = (await capture_row(engine, "cap-1"))["next_attempt_at"]
    assert outcomes == ["retrying", "retrying", "failed"]
    assert len(hook.hits) == 3
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "FAILED" and row["last_error"] == "webhook: webhook timed out"
    assert await outbox_payloads(engine, settings.topic("captures.ready")) == []
    [dead] = await outbox_payloads(engine, settings.topic("captures.dlt"))
    assert dead["capture_id"] == "cap-1"
