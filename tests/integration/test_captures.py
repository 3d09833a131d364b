"""Captures against the real database: submission (fenced, idempotent by capture_id), the handoff
claim raced by two workers, finalisation, and the capture reaper."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import make_engine
from app.handoff import Delivery, TargetError
from app.lease_secrets import lease_secret_hash
from app.settings import Settings
from app.store import Database, domains, jobs
from reapers.lapsed_handoffs import LapsedHandoffs
from reapers.undispatched_captures import UndispatchedCaptures
from tests.support.captures import capture_row, outbox_payloads, relayed, running_job, submit
from tests.support.leasing import replies, request, scalar
from tests.support.statements import Statements
from tests.support.waiting import eventually
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor


class Recorder:
    """A target that records each delivery (and may be told to fail)."""

    name = "recorder"

    def __init__(self, error: TargetError | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.error = error

    async def deliver(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        await asyncio.sleep(0)  # the other worker gets its turn here
        if self.error is not None:
            raise self.error

    def targets(self, delivery: Delivery) -> list[Recorder]:
        return [self]


def worker(settings: Settings, engine: AsyncEngine, target: Recorder, name: str) -> HandoffWorker:
    return HandoffWorker(settings, Database(engine), holder=name, targets=target.targets)


async def test_submit_records_the_capture_replies_and_dispatches_its_handoff_together(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    assert await processor.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
    reply = (await replies(engine, settings, "job-1"))[-1]
    assert reply["type"] == "capture.accepted" and reply["capture_id"] == "cap-1"
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "RECEIVED" and row["site"] == "board" and row["meta"] == {"page": 1}
    assert await outbox_payloads(engine, settings.topic("captures")) == [
        {"type": "capture.handoff", "v": 1, "capture_id": "cap-1"}
    ]
    events = await outbox_payloads(engine, settings.topic("events"))
    assert events[-1]["type"] == "capture.received" and events[-1]["id"] == "cap-1"


async def test_a_new_capture_of_a_live_lease_is_added_without_a_read_before_it(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    own = make_engine(settings, pool_size=1, pre_ping=False)  # counted from its first connection
    statements = Statements(own)
    try:
        counted = RequestProcessor(settings, Database(own))
        with statements.counting() as counts:
            assert await counted.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
    finally:
        await own.dispose()
    # BEGIN, the sites' locks with the inbox claim, the site's rewrite rules, the fenced insert,
    # the outbox, COMMIT: neither the capture nor the job is read first
    assert sum(counts.values()) == 6, counts
    assert (await replies(engine, settings, "job-1"))[-1]["type"] == "capture.accepted"


async def test_the_same_capture_again_is_accepted_again_and_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    await processor.process(submit(settings, "job-1", lease, "cap-1"))  # a new request_id
    kinds = [r["type"] for r in await replies(engine, settings, "job-1")]
    assert kinds[-2:] == ["capture.accepted", "capture.accepted"]
    assert len(await outbox_payloads(engine, settings.topic("captures"))) == 1


async def test_the_same_capture_id_with_another_body_is_a_conflict(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    await processor.process(submit(settings, "job-1", lease, "cap-1", size=99))
    assert (await replies(engine, settings, "job-1"))[-1]["type"] == "request.conflict"
    assert (await capture_row(engine, "cap-1"))["size"] == 1234
    assert len(await outbox_payloads(engine, settings.topic("captures"))) == 1


async def test_submit_with_a_stale_token_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    await processor.process(
        submit(settings, "job-1", {**lease, "lease_token": lease["lease_token"] + 1000}, "cap-1")
    )
    reply = (await replies(engine, settings, "job-1"))[-1]
    assert reply["type"] == "job.lease_lost" and reply["reason"] == "stale_token"
    assert await scalar(engine, "SELECT count(*) FROM captures") == 0
    assert await outbox_payloads(engine, settings.topic("captures")) == []


async def test_a_submit_racing_a_finish_that_commits_first_records_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    async with engine.connect() as finisher:
        await finisher.begin()
        assert (
            await jobs.finish_job(
                finisher,
                "job-1",
                lease["lease_token"],
                lease_secret_hash(lease["lease_secret"]),
                "SUCCEEDED",
                None,
            )
            is not None
        )
        submitting = asyncio.create_task(processor.process(submit(settings, "job-1", lease, "c1")))

        async def blocked_or_done() -> bool:
            waiting = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return submitting.done() or await scalar(engine, waiting) > 0

        await eventually(blocked_or_done)
        await finisher.commit()
    assert await submitting == "replied"
    reply = (await replies(engine, settings, "job-1"))[-1]
    assert reply["type"] == "job.lease_lost"
    assert await scalar(engine, "SELECT count(*) FROM captures") == 0
    assert await outbox_payloads(engine, settings.topic("captures")) == []


async def test_two_workers_racing_on_one_capture_deliver_once_and_publish_one_ready(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    target = Recorder()
    one, two = worker(settings, engine, target, "w1"), worker(settings, engine, target, "w2")
    outcomes = await asyncio.gather(one.hand_off("cap-1"), two.hand_off("cap-1"))
    assert sorted(outcomes) == ["handed_off", "skipped"]
    assert [d.capture_id for d in target.deliveries] == ["cap-1"]
    ready = await outbox_payloads(engine, settings.topic("captures.ready"))
    assert [r["capture_id"] for r in ready] == ["cap-1"]
    assert ready[0]["url"] == "https://board.example.com/items/cap-1"
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "HANDED_OFF" and row["handed_off_at"] is not None


async def test_a_lapsed_claim_is_reaped_republished_and_its_old_token_finalises_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    target = Recorder()
    zombie = worker(settings, engine, target, "zombie")
    claimed = await zombie._claim("cap-1", None)  # claimed, then its worker "dies"
    assert claimed is not None
    sweep = LapsedHandoffs(settings, Database(engine))
    assert (await sweep.run_once()).changed == []  # the lease has not lapsed yet
    later = claimed["handoff_expires_at"] + timedelta(seconds=1)
    assert (await sweep.run_once(later)).changed == ["cap-1"]
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "RECEIVED" and row["attempts"] == 1
    assert row["last_error"] == "handoff_lease_expired"
    assert len(await outbox_payloads(engine, settings.topic("captures"))) == 2  # republished
    # the zombie comes back: its token finalises nothing and publishes nothing
    assert await zombie._finalise(claimed, None, None, None) == "lost"
    assert await outbox_payloads(engine, settings.topic("captures.ready")) == []
    # the next worker hands it off once
    assert await worker(settings, engine, target, "w2").hand_off("cap-1", now=later) == "handed_off"
    assert len(await outbox_payloads(engine, settings.topic("captures.ready"))) == 1


async def test_a_claim_that_keeps_lapsing_ends_failed_with_a_dead_letter(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(update={"handoff_max_attempts": 2})
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    sweep = LapsedHandoffs(settings, Database(engine))
    now = None
    for _ in range(2):
        claimed = await worker(settings, engine, Recorder(), "w")._claim("cap-1", now)
        assert claimed is not None
        now = claimed["handoff_expires_at"] + timedelta(seconds=1)
        await sweep.run_once(now)
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "FAILED" and row["attempts"] == 2
    [dead] = await outbox_payloads(engine, settings.topic("captures.dlt"))
    assert dead["capture_id"] == "cap-1"
    headers = await dead_letter_headers(engine, settings)
    assert headers["qm.dlt.error_message"] == "handoff_lease_expired"
    assert headers["qm.dlt.attempts"] == "2"
    assert headers["qm.dlt.original_topic"] == settings.topic("captures")
    events = await outbox_payloads(engine, settings.topic("events"))
    assert events[-1]["type"] == "capture.failed"


async def test_a_due_capture_without_a_record_in_flight_is_dispatched_again(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(update={"handoff_redispatch_seconds": 30})
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    sweep = UndispatchedCaptures(settings, Database(engine))
    row = await capture_row(engine, "cap-1")
    assert (await sweep.run_once()).changed == []  # its record waits unsent in the outbox
    await relayed(engine, settings.topic("captures"))  # published; nobody claimed it
    assert (await sweep.run_once()).changed == []  # still within the redispatch delay
    later = row["dispatched_at"] + timedelta(seconds=31)
    assert (await sweep.run_once(later)).changed == ["cap-1"]
    assert (await sweep.run_once(later)).changed == []  # its new record is in flight
    assert len(await outbox_payloads(engine, settings.topic("captures"))) == 1


async def dead_letter_headers(engine: AsyncEngine, settings: Settings) -> dict[str, str]:
    import base64

    headers = await scalar(
        engine,
        "SELECT headers FROM outbox WHERE topic = :t ORDER BY id DESC LIMIT 1",
        t=settings.topic("captures.dlt"),
    )
    return {name: base64.b64decode(value).decode() for name, value in headers}


async def test_a_capture_url_goes_through_the_site_domain_rewrites(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    from app.store import domains

    lease = await running_job(processor, engine, settings)
    async with engine.begin() as conn:
        await domains.add_rewrite(
            conn, site="board", from_host="board.example.com", to_host="new.example.com"
        )
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    assert (await capture_row(engine, "cap-1"))["url"] == "https://new.example.com/items/cap-1"
    # the same submission again is the same capture (its fingerprint is of the body as sent)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    assert (await replies(engine, settings, "job-1"))[-1]["type"] == "capture.accepted"


async def test_a_capture_refused_by_the_fence_counts_no_rewrite_and_says_why(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    lease = await running_job(processor, engine, settings)
    async with engine.begin() as conn:
        await domains.add_rewrite(
            conn, site="board", from_host="board.example.com", to_host="mirror.example.com"
        )
    finish = request(settings, "job.finish", "job-1", **lease, outcome="succeeded")
    assert await processor.process(finish) == "replied"
    # the job has ended but its token is the one the collector holds: the fence refuses
    assert await processor.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
    reply = (await replies(engine, settings, "job-1"))[-1]
    assert reply["type"] == "job.lease_lost" and reply["reason"] == "job_succeeded"
    assert await scalar(engine, "SELECT count(*) FROM captures") == 0
    assert await scalar(engine, "SELECT count(*) FROM domain_rewrite_uses") == 0
