"""Security of leasing against the real database: fencing of cancel, operator revoke, reply
topics, caps and the safe minimum lease, and the inbox's retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.db.migrate import upgrade
from app.sealing import public_key_text
from app.settings import Settings
from app.store import Database
from reapers.inbox_retention import InboxRetention
from tests.conftest import asyncpg_dsn
from tests.support.cli import operator_cli
from tests.support.databases import empty_database
from tests.support.leasing import cancel, lease_fields, make_site, replies, request, scalar, start
from tests.support.waiting import eventually
from workers.requests import Incoming, RequestProcessor


async def outbox(engine: AsyncEngine, topic: str) -> list[dict]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t ORDER BY id"), {"t": topic}
        )
        return [json.loads(bytes(r[0])) for r in rows]


async def granted_lease(engine: AsyncEngine, settings: Settings, job_id: str) -> dict:
    [grant] = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    return lease_fields(grant)


# --- fencing of cancel, and the operator's revoke ------------------------------------------


async def test_cancel_of_a_running_job_needs_its_live_token_and_secret(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "held"))
    lease = await granted_lease(engine, settings, "held")
    token = lease["lease_token"]
    await processor.process(cancel(settings, "held"))
    await processor.process(cancel(settings, "held", **{**lease, "lease_token": token + 1}))
    await processor.process(cancel(settings, "held", lease_token=token))
    answers = await replies(engine, settings, "held")
    assert [(r["type"], r.get("reason")) for r in answers[1:]] == [
        ("job.lease_lost", "lease_token_required"),
        ("job.lease_lost", "stale_token"),
        ("job.lease_lost", "wrong_secret"),  # the token is public: the secret is the holder's
    ]
    assert await scalar(engine, "SELECT status::text FROM jobs") == "RUNNING"
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "held"

    await processor.process(cancel(settings, "held", **lease))
    assert (await replies(engine, settings, "held"))[-1]["type"] == "job.cancelled"
    assert await scalar(engine, "SELECT status::text FROM jobs") == "CANCELLED"
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
    assert await scalar(engine, "SELECT running FROM sites") == 0


async def test_cancel_of_a_waiting_job_needs_no_token(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "waiter"))
    await processor.process(cancel(settings, "waiter"))
    kinds = [(r["type"], r.get("reason")) for r in await replies(engine, settings, "waiter")]
    assert kinds == [
        ("job.queued", "capacity"),  # what holds the line
        ("job.rejected", "cancelled"),
        ("job.cancelled", None),
    ]


async def test_a_waiting_job_is_cancelled_only_by_its_requester(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    """A job id is no secret (events and job-events name it): without the public key its start
    named, or with another collector's, a cancel of a waiting job changes nothing."""
    await make_site(engine, settings)
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "waiter"))
    other = public_key_text(X25519PrivateKey.generate())
    await processor.process(request(settings, "job.cancel", "waiter"))  # no key at all
    await processor.process(cancel(settings, "waiter", public_key=other))
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'waiter'") == "QUEUED"
    kinds = [(r["type"], r.get("reason")) for r in await replies(engine, settings, "waiter")]
    assert kinds == [("job.queued", "capacity"), ("job.rejected", "not_yours"),
                     ("job.rejected", "not_yours")]  # fmt: skip
    await processor.process(cancel(settings, "waiter"))  # its requester's
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'waiter'") == "CANCELLED"


@pytest.fixture
def qm(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    with operator_cli(settings, monkeypatch) as runner:
        yield runner


async def test_an_operator_revokes_a_lease_and_the_holder_hears_lease_lost(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, qm: CliRunner
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "holder"))
    await processor.process(start(settings, "next"))
    lease = await granted_lease(engine, settings, "holder")
    token = lease["lease_token"]

    result = await asyncio.to_thread(
        qm.invoke, app, ["jobs", "revoke", "holder", "--reason", "account misuse"]
    )
    assert result.exit_code == 0, result.output
    assert f"lease {token} of job holder revoked" in result.output
    holder = await replies(engine, settings, "holder")
    assert (holder[-1]["type"], holder[-1]["reason"]) == ("job.lease_lost", "revoked")
    assert holder[-1]["request_id"] == holder[0]["request_id"]  # on the start's own reply path
    assert await scalar(engine, "SELECT holder_job_id FROM accounts") == "next"  # handed on
    assert await scalar(engine, "SELECT reason FROM jobs WHERE id = 'holder'") == (
        "revoked: account misuse"
    )

    await processor.process(request(settings, "job.heartbeat", "holder", **lease))
    [*_, answer] = await replies(engine, settings, "holder")
    assert (answer["type"], answer["reason"]) == ("job.lease_lost", "job_cancelled")
    again = await asyncio.to_thread(
        qm.invoke, app, ["jobs", "revoke", "holder", "--reason", "again"]
    )
    assert again.exit_code == 2 and "not running" in again.output
    missing = await asyncio.to_thread(qm.invoke, app, ["jobs", "revoke", "ghost", "--reason", "x"])
    assert missing.exit_code == 2 and "no job 'ghost'" in missing.output


# --- reply topics ----------------------------------------------------------------------------


def with_reply_to(record: Incoming, topic: str) -> Incoming:
    return Incoming(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp_ms,
        record.key,
        record.value,
        [*record.headers, ("reply_to", topic.encode())],
    )


@pytest.mark.parametrize("where", ["job-events", "captures.ready", "no-such-topic"])
async def test_a_reply_to_outside_the_reply_topics_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, where: str
) -> None:
    await make_site(engine, settings)
    target = settings.topic(where)
    outcome = await processor.process(with_reply_to(start(settings, "job-1"), target))
    assert outcome == "dead_lettered"
    assert await outbox(engine, target) == []
    [invalid] = await replies(engine, settings, "job-1")  # answered on the default topic
    assert invalid["type"] == "request.invalid" and "reply_to" in invalid["error"]
    assert len(await outbox(engine, settings.topic("requests.dlt"))) == 1
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0


async def test_a_reply_topic_of_the_pattern_is_used(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    own = settings.topic("replies.collector-7")
    assert await processor.process(with_reply_to(start(settings, "job-1"), own)) == "replied"
    assert [r["type"] for r in await outbox(engine, own)] == ["job.granted"]


# --- caps and the safe minimum -------------------------------------------------------------


async def test_a_lease_wait_or_extension_over_the_cap_is_refused_with_a_reason(
    engine: AsyncEngine, settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_lease_seconds": 600})
    processor = RequestProcessor(capped, Database(engine))
    await make_site(engine, settings)
    await processor.process(start(settings, "long", lease_seconds=601))
    await processor.process(start(settings, "patient", wait_seconds=601))
    await processor.process(start(settings, "fine", lease_seconds=600))
    lease = await granted_lease(engine, settings, "fine")
    await processor.process(request(settings, "job.heartbeat", "fine", **lease, extend_seconds=601))
    errors = [r["error"] for r in await replies(engine, settings) if r["type"] == "request.invalid"]
    assert errors == [
        "lease_seconds 601 is over the cap of 600 seconds (QM_MAX_LEASE_SECONDS)",
        "wait_seconds 601 is over the cap of 600 seconds (QM_MAX_LEASE_SECONDS)",
        "extend_seconds 601 is over the cap of 600 seconds (QM_MAX_LEASE_SECONDS)",
    ]
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 1


async def test_a_lease_runs_from_its_grant_and_short_leases_are_raised_to_the_safe_minimum(
    engine: AsyncEngine, settings: Settings
) -> None:
    safe = settings.model_copy(update={"min_lease_seconds": None})  # the default rule
    assert safe.shortest_lease() == 3 * settings.consumer_session_timeout_ms // 1000
    processor = RequestProcessor(safe, Database(engine))
    await make_site(engine, settings)
    await processor.process(start(settings, "brief", lease_seconds=1))
    [grant] = await replies(engine, settings, "brief")
    granted_at = await scalar(engine, "SELECT granted_at FROM jobs")
    assert datetime.fromisoformat(grant["granted_at"]) == granted_at
    lease = await scalar(engine, "SELECT lease_expires_at - granted_at FROM jobs")
    assert lease == timedelta(seconds=safe.shortest_lease())
    await processor.process(
        request(settings, "job.heartbeat", "brief", **lease_fields(grant), extend_seconds=1)
    )
    extended = (await replies(engine, settings, "brief"))[-1]
    assert extended["type"] == "job.extended"
    assert extended["lease_expires_at"] >= grant["lease_expires_at"]


async def test_time_spent_waiting_on_the_site_lock_is_not_taken_off_the_lease(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, lease_seconds=60)
    async with engine.connect() as blocker:
        await blocker.execute(text("SELECT 1 FROM sites WHERE slug = 'board' FOR UPDATE"))
        started = asyncio.create_task(processor.process(start(settings, "patient")))
        await eventually(lambda: waiting_on_a_lock(engine), timeout=10)
        released_at = await blocker.scalar(text("SELECT clock_timestamp()"))
        await blocker.commit()
    assert await started == "replied"
    async with engine.connect() as conn:
        row = await conn.execute(text("SELECT created_at, granted_at, lease_expires_at FROM jobs"))
        created_at, granted_at, expires_at = row.one()
    assert created_at < released_at <= granted_at  # the transaction began before the wait
    assert expires_at - granted_at == timedelta(seconds=60)


async def waiting_on_a_lock(engine: AsyncEngine) -> bool:
    return bool(
        await scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()",
        )
    )


# --- the inbox keeps only what is safe, for a while ----------------------------------------


async def test_the_inbox_keeps_no_secret_and_forgets_requests_after_the_retention(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    first = start(settings, "job-1")
    await processor.process(first)
    kept = await scalar(engine, "SELECT reply::text FROM inbox")
    assert "job.granted" in kept and "canary" not in kept
    db = Database(engine)
    small = settings.model_copy(update={"inbox_prune_batch": 1})
    now = await scalar(engine, "SELECT now()")
    assert (await InboxRetention(small, db).run_once(now=now)).changed == []
    later = now + timedelta(seconds=settings.inbox_retention_seconds + 1)
    await processor.process(start(settings, "job-2"))
    pruned = await InboxRetention(small, db).run_once(now=later)
    assert len(pruned.changed) == 2  # in batches of one
    assert await scalar(engine, "SELECT count(*) FROM inbox") == 0
    # a repeat after the retention is a new request: the job exists, so it is refused
    await processor.process(first)
    assert (await replies(engine, settings, "job-1"))[-1]["reason"] == "job_exists"


# --- the upgrade to sealed grants ------------------------------------------------------------


async def test_the_upgrade_forgets_clear_grants_and_ends_jobs_that_cannot_be_sealed_to(
    postgres_admin_url: str,
) -> None:
    async with empty_database(postgres_admin_url) as url:
        await asyncio.to_thread(upgrade, url, "0005")
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(
                "INSERT INTO sites (slug, host, capacity) VALUES ('s', 's.example.com', 1);"
                "INSERT INTO jobs (id, site, collector, status, lease_seconds, wait_deadline,"
                " request_id, reply_to, correlation_id) VALUES ('old', 's', 'c', 'QUEUED', 60,"
                " now() + interval '1 hour', gen_random_uuid(), 'qm.replies', 'c');"
                "INSERT INTO inbox (request_id, job_id, request_type, fingerprint, reply_topic,"
                " reply) VALUES (gen_random_uuid(), 'old', 'job.start', 'f', 'qm.replies',"
                ' \'{"type": "job.granted", "account": {"secret": "canary"}}\')'
            )
            await asyncio.to_thread(upgrade, url)
            job = await conn.fetchrow("SELECT status::text, reason FROM jobs")
            assert tuple(job) == ("TIMED_OUT", "public_key_required")
            assert await conn.fetchval("SELECT reply IS NULL FROM inbox")
        finally:
            await conn.close()
