"""The webhook target through the real handoff worker code against a real HTTP server on loopback:
retries with backoff on the database clock, a refusal that fails at once, a receiver that never
answers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from reapers.lapsed_handoffs import LapsedHandoffs
from reapers.undispatched_captures import UndispatchedCaptures
from tests.support.captures import (
    capture_row,
    outbox_payloads,
    relayed,
    running_job,
    submit,
    webhook,
)
from tests.support.waiting import eventually
from workers.consuming import Incoming
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


async def test_a_slow_webhook_keeps_its_short_handoff_claim_alive_and_is_called_once(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    """A target slower than three handoff leases, through the worker's batches: its record is
    settled at once (the claim is in the database) and the worker renews the claim while the
    target answers, so the lapsed-handoff sweep, running all along on the database clock,
    never takes it back."""
    settings = settings.model_copy(
        update={"handoff_lease_seconds": 1.5, "webhook_timeout_seconds": 20.0}
    )
    worker = HandoffWorker(settings, Database(engine))
    sweep = LapsedHandoffs(settings, Database(engine))
    with webhook(200, delay=5.0) as hook:
        token = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", token, "cap-1"))
        record = Incoming(settings.topic("captures"), 0, 1, 0, b"cap-1", b'{"capture_id": "cap-1"}')
        assert await asyncio.wait_for(worker.enqueue(record), 5) == "handing_off"
        reaped: list[object] = []

        async def swept_until_settled() -> bool:
            reaped.extend((await sweep.run_once()).changed)
            return (await capture_row(engine, "cap-1"))["status"] != "HANDING_OFF"

        await eventually(swept_until_settled, timeout=30, every=0.2)
        await worker.drain(10)
    assert reaped == []
    assert [hit.idempotency_key for hit in hook.hits] == ["cap-1"]
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "HANDED_OFF" and row["attempts"] == 0


async def test_a_handoff_whose_claim_was_reaped_meanwhile_stops_and_publishes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(
        update={"handoff_lease_seconds": 0.9, "webhook_timeout_seconds": 30.0}
    )
    worker = HandoffWorker(settings, Database(engine))
    sweep = LapsedHandoffs(settings, Database(engine))
    with webhook(0) as hook:  # never answers
        token = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", token, "cap-1"))
        handing = asyncio.create_task(worker.hand_off("cap-1"))
        claim = await eventually_claimed(engine)

        async def called() -> bool:
            return len(hook.hits) == 1

        await eventually(called, timeout=10)  # the target is answering, slowly
        later = claim["handoff_expires_at"] + timedelta(hours=1)  # as if the worker had stalled
        assert (await sweep.run_once(later)).changed == ["cap-1"]
        assert await asyncio.wait_for(handing, 10) == "lost"  # at its next renewal
    assert len(hook.hits) == 1
    assert (await capture_row(engine, "cap-1"))["status"] == "RECEIVED"
    assert await outbox_payloads(engine, settings.topic("captures.ready")) == []


async def eventually_claimed(engine: AsyncEngine) -> dict[str, object]:
    async def claimed() -> dict[str, object] | None:
        row = await capture_row(engine, "cap-1")
        return row if row["status"] == "HANDING_OFF" else None

    row = await eventually(claimed, timeout=10)
    assert row is not None
    return row
