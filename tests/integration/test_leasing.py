"""Leasing against the real database: grants, FIFO, the capacity gate, fencing, idempotency, races.

Every test runs twice: with each request in a transaction of its own, where the races are real
concurrent transactions (``asyncio.gather`` over separate pooled connections), and with requests
that arrive together sharing one transaction, as the claim worker's group commit does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine

from app.sealing import Unsealable
from app.settings import Settings
from app.store import Database
from tests.support.leasing import (
    cancel,
    lease_fields,
    make_site,
    opened_secret,
    replies,
    request,
    retried,
    scalar,
    start,
)
from workers.requests import RequestProcessor


@pytest.fixture(params=[1, 32], ids=["own-transactions", "shared-transactions"])
async def processor(
    request: pytest.FixtureRequest, settings: Settings, engine: AsyncEngine
) -> RequestProcessor:
    return RequestProcessor(
        settings.model_copy(update={"worker_batch_max": request.param}), Database(engine)
    )


async def granted(engine: AsyncEngine, settings: Settings, job_id: str) -> dict:
    [reply] = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    return reply


async def test_start_grants_an_account_with_its_secret_sealed_to_the_collector(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    assert await processor.process(start(settings, "job-1")) == "replied"
    reply = await granted(engine, settings, "job-1")
    assert reply["lease_token"] >= 1 and reply["account"]["username"] == "user0@board"
    assert "canary" not in json.dumps(reply)
    assert opened_secret(reply).startswith("canary")
    with pytest.raises(Unsealable):  # another collector's key opens nothing
        opened_secret(reply, X25519PrivateKey.generate())
    assert await scalar(engine, "SELECT status::text FROM accounts") == "USING"
    assert await scalar(engine, "SELECT running FROM sites") == 1


async def test_unknown_site_and_siteless_accounts_are_refused_with_a_reason(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await processor.process(start(settings, "job-1", site="nowhere"))
    await make_site(engine, settings, "empty", n_accounts=0)
    await processor.process(start(settings, "job-2", site="empty"))
    reasons = [(r["job_id"], r["reason"]) for r in await replies(engine, settings)]
    assert reasons == [("job-1", "unknown_site"), ("job-2", "no_accounts")]


async def test_concurrent_starts_never_exceed_capacity_and_queue_the_rest(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=4, n_accounts=5)
    await asyncio.gather(*(processor.process(start(settings, f"job-{n}")) for n in range(20)))
    kinds = [r["type"] for r in await replies(engine, settings)]
    assert kinds.count("job.granted") == 4 and kinds.count("job.queued") == 16
    assert await scalar(engine, "SELECT running FROM sites") == 4
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE status = 'USING'") == 4


async def test_a_release_hands_the_account_to_the_oldest_waiting_job(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=1)
    for n in range(4):
        await processor.process(start(settings, f"job-{n}"))
    lease = lease_fields(await granted(engine, settings, "job-0"))
    await processor.process(request(settings, "job.finish", "job-0", **lease, outcome="succeeded"))
    assert (await granted(engine, settings, "job-1"))["lease_token"] > lease["lease_token"]
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'job-2'") == "QUEUED"
    positions = [
        r["position"] for r in await replies(engine, settings) if r["type"] == "job.queued"
    ]
    assert positions == [1, 2, 3]


async def test_two_concurrent_finishes_have_exactly_one_winner(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "job-1"))
    lease = lease_fields(await granted(engine, settings, "job-1"))
    finishes = [
        request(settings, "job.finish", "job-1", **lease, outcome=outcome)
        for outcome in ("succeeded", "failed")
    ]
    await asyncio.gather(*(processor.process(f) for f in finishes))
    answers = [r for r in await replies(engine, settings, "job-1") if r["type"] != "job.granted"]
    assert sorted(r["type"] for r in answers) == ["job.finished", "job.lease_lost"]
    [won] = [r for r in answers if r["type"] == "job.finished"]
    assert await scalar(engine, "SELECT status::text FROM jobs") == won["status"]
    assert await scalar(engine, "SELECT running FROM sites") == 0
    errors = await scalar(engine, "SELECT error_count FROM accounts")
    assert errors == (1 if won["status"] == "FAILED" else 0)


async def test_finish_racing_a_heartbeat_ends_the_job_once_and_the_heartbeat_changes_nothing_after(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "job-1"))
    lease = lease_fields(await granted(engine, settings, "job-1"))
    await asyncio.gather(
        processor.process(request(settings, "job.finish", "job-1", **lease, outcome="succeeded")),
        processor.process(request(settings, "job.heartbeat", "job-1", **lease, extend_seconds=600)),
    )
    kinds = sorted(r["type"] for r in await replies(engine, settings, "job-1"))
    assert kinds in (
        ["job.extended", "job.finished", "job.granted"],
        ["job.finished", "job.granted", "job.lease_lost"],
    )
    assert await scalar(engine, "SELECT status::text FROM jobs") == "SUCCEEDED"
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    assert await scalar(engine, "SELECT lease_expires_at IS NULL FROM accounts")


async def test_a_zombie_with_an_old_token_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "job-a"))
    old = lease_fields(await granted(engine, settings, "job-a"))
    await processor.process(request(settings, "job.finish", "job-a", **old, outcome="succeeded"))
    await processor.process(start(settings, "job-b"))
    new = lease_fields(await granted(engine, settings, "job-b"))
    assert new["lease_token"] > old["lease_token"]
    # the zombie of job-a, and a forger presenting job-a's token for job-b
    await processor.process(request(settings, "job.finish", "job-a", **old, outcome="blocked"))
    await processor.process(request(settings, "job.heartbeat", "job-b", **old))
    await processor.process(request(settings, "job.finish", "job-b", **old, outcome="blocked"))
    lost = [r["reason"] for r in await replies(engine, settings) if r["type"] == "job.lease_lost"]
    assert lost == ["job_succeeded", "stale_token", "stale_token"]
    assert await scalar(engine, "SELECT status::text FROM accounts") == "USING"
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "job-b"
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'job-b'") == "RUNNING"


async def test_cancel_racing_a_grant_leaves_no_cancelled_job_holding_anything(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "waiter"))
    lease = lease_fields(await granted(engine, settings, "holder"))
    # the holder's finish grants the waiter while the waiter's cancel (without a token) runs
    await asyncio.gather(
        processor.process(request(settings, "job.finish", "holder", **lease, outcome="succeeded")),
        processor.process(cancel(settings, "waiter")),
    )
    waiter = [r["type"] for r in await replies(engine, settings, "waiter")]
    status = await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'waiter'")
    if waiter[-1] == "job.cancelled":  # the cancel came first: nothing is held
        assert status == "CANCELLED" and waiter.count("job.rejected") == 1
        assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
        assert await scalar(engine, "SELECT running FROM sites") == 0
        assert await scalar(engine, "SELECT count(*) FROM job_grants WHERE ended_at IS NULL") == 0
    else:  # the grant came first: a running job's cancel needs its token, and changed nothing
        assert waiter[-2:] == ["job.granted", "job.lease_lost"] and status == "RUNNING"
        assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "waiter"
        assert await scalar(engine, "SELECT running FROM sites") == 1


async def test_the_same_request_twice_gets_the_identical_reply_and_a_changed_body_a_conflict(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    first = start(settings, "job-1", request_id="6f1c1d52-0d6e-4d0e-9d86-6c2f5d6c0a01")
    assert await processor.process(first) == "replied"
    assert await processor.process(retried(first)) == "duplicate"
    changed = start(
        settings, "job-1", request_id="6f1c1d52-0d6e-4d0e-9d86-6c2f5d6c0a01", collector="other"
    )
    assert await processor.process(changed) == "conflict"
    answers = await replies(engine, settings, "job-1")
    assert answers[0] == answers[1] and answers[0]["type"] == "job.granted"
    assert answers[2]["type"] == "request.conflict"
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1


async def test_the_very_record_read_again_adds_no_second_reply_and_a_retry_is_answered_again(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    first = start(settings, "job-1")
    assert await processor.process(first) == "replied"
    # its worker died before committing the offset: the same record, read again
    assert await processor.process(first) == "redelivered"
    assert [r["type"] for r in await replies(engine, settings, "job-1")] == ["job.granted"]
    assert await processor.process(retried(first)) == "duplicate"  # the client asked again
    answers = await replies(engine, settings, "job-1")
    assert len(answers) == 2 and answers[0] == answers[1]
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1


async def test_concurrent_duplicates_of_one_request_grant_once(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=3, n_accounts=3)
    same = start(settings, "job-1")
    # five workers at once (one worker keeps a job's requests in order, never side by side)
    workers = [RequestProcessor(processor.settings, processor.db) for _ in range(5)]
    copies = [same] + [retried(same) for _ in range(4)]
    outcomes = await asyncio.gather(*(w.process(c) for w, c in zip(workers, copies, strict=True)))
    assert sorted(outcomes) == ["duplicate"] * 4 + ["replied"]
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1


async def test_a_retry_at_the_same_position_of_a_recreated_or_other_requests_topic_is_answered(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    first = dataclasses.replace(start(settings, "job-1"), timestamp_ms=1_700_000_000_000)
    assert await processor.process(first) == "replied"
    # the topic was deleted and made again: the client's retry is a new record that happens
    # to take the same partition and offset, written later
    recreated = dataclasses.replace(first, timestamp_ms=first.timestamp_ms + 5_000)
    assert await processor.process(recreated) == "duplicate"
    # the same position of another topic (requests under another prefix) is another record
    elsewhere = dataclasses.replace(first, topic=f"other.{first.topic}")
    assert await processor.process(elsewhere) == "duplicate"
    assert await processor.process(first) == "redelivered"  # the very record, read again
    answers = await replies(engine, settings, "job-1")
    assert len(answers) == 3 and answers[0] == answers[1] == answers[2]
