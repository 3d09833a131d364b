"""A lease is a capability only its holder has: what a reader of the shared replies topic, or a
writer of requests, can do to another collector's lease (nothing), against the real database and
broker.

Every collector reads ``qm.replies``, so a grant's ``job_id``, ``lease_token``, ``upload_key`` and
correlation id are public; every collector writes ``qm.requests``, so any of them can send any
request with any headers. The hostile collector here knows what the grant shows and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import client_options, producer_options, sdk_client
from app.sealing import public_key_text
from app.settings import Settings
from app.store import Database, seeds
from reapers.expired_leases import ExpiredLeases
from schemas.messages import JobCancel
from tests.support.leasing import (
    lease_fields,
    make_site,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from tests.support.processes import QmProcess
from workers.requests import RequestProcessor

FOLLOW_UPS = ["job.heartbeat", "job.finish", "job.cancel", "session.upload", "seeds.claim",
              "capture.submit"]  # fmt: skip
DEADLINE = 30.0
COOKIE = {"cookies": [{"name": "sid", "value": "hostile", "domain": "board.example.com",
                       "path": "/"}]}  # fmt: skip


async def add_seeds(engine: AsyncEngine, n: int, site: str = "board") -> None:
    async with engine.begin() as conn:
        for i in range(n):
            await seeds.add_seed(
                conn,
                site=site,
                url=f"https://{site}.example.com/{i}",
                interval_seconds=3600,
                priority=0,
            )


async def snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """Everything a follow-up of the lease could change."""
    queries = {
        "job": "SELECT status::text, lease_token, lease_expires_at, reason FROM jobs",
        "account": "SELECT status::text, holder_job_id, lease_expires_at, blocked_until"
        " FROM accounts",
        "sessions": "SELECT count(*) FROM sessions",
        "seeds": "SELECT id, status::text, holder_job_id FROM seeds ORDER BY id",
        "captures": "SELECT count(*) FROM captures",
        "grants": "SELECT lease_token, ended_at FROM job_grants ORDER BY lease_token",
        "running": "SELECT running FROM sites",
    }
    async with engine.connect() as conn:
        return {name: (await conn.execute(text(sql))).all() for name, sql in queries.items()}


def follow_up(kind: str, grant: dict[str, Any], **lease: Any) -> dict[str, Any]:
    """The body of a follow-up of ``kind`` on the lease of ``grant``, made only of what the grant
    shows (and the ``lease`` fields given)."""
    job_id = grant["job_id"]
    fields: dict[str, Any] = {
        "job.heartbeat": {"extend_seconds": 3600},
        "job.finish": {"outcome": "blocked", "reason": "hostile", "cooldown_seconds": 2_592_000},
        "job.cancel": {},
        "session.upload": {
            "storage_state": sealed_state(COOKIE, "session.upload", job_id, grant["upload_key"])
        },
        "seeds.claim": {"limit": 5},
        "capture.submit": {
            "capture_id": f"hostile-{uuid.uuid4().hex[:8]}",
            "url": "https://board.example.com/forged",
            "storage_uri": "s3://hostile/forged",
            "sha256": hashlib.sha256(b"forged").hexdigest(),
            "content_type": "text/html",
            "size": 6,
            "captured_at": datetime.now(UTC).isoformat(),
        },
    }[kind]
    return {**fields, **lease}


@pytest.mark.parametrize("kind", FOLLOW_UPS)
async def test_a_reader_of_a_grant_cannot_act_on_its_lease_and_the_holder_still_can(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, kind: str
) -> None:
    await make_site(engine, settings, lease_seconds=300)
    await add_seeds(engine, 4)
    await processor.process(start(settings, "held", needs={"account": True, "seeds": 1}))
    [grant] = await replies(engine, settings, "held")
    assert grant["type"] == "job.granted"
    before = await snapshot(engine)

    # what the replies topic shows: the token (the old contract took it alone), then the token
    # with a secret of the reader's own making
    token_only = follow_up(kind, grant, lease_token=grant["lease_token"])
    await processor.process(request(settings, kind, "held", **token_only))
    guessed = {"lease_token": grant["lease_token"], "lease_secret": secrets.token_urlsafe(32)}
    await processor.process(request(settings, kind, "held", **follow_up(kind, grant, **guessed)))

    [first, second] = (await replies(engine, settings, "held"))[1:]
    assert first["type"] in ("request.invalid", "job.lease_lost"), first
    assert (second["type"], second.get("reason")) == ("job.lease_lost", "wrong_secret"), second
    assert await snapshot(engine) == before  # nothing changed

    holder = lease_fields(grant)  # the secret opened with the holder's own key
    await processor.process(request(settings, "job.finish", "held", **holder, outcome="succeeded"))
    finished = (await replies(engine, settings, "held"))[-1]
    assert (finished["type"], finished.get("status")) == ("job.finished", "SUCCEEDED")
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"


async def test_a_start_of_an_expired_job_from_another_collector_is_refused_and_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, lease_seconds=60)
    await processor.process(start(settings, "lapsed"))
    later = await scalar(engine, "SELECT now() + interval '61 seconds'")
    swept = await ExpiredLeases(settings, Database(engine)).run_once(now=later)
    assert swept.changed == ["lapsed"]
    columns = "status::text, collector, public_key, request_id, reply_to, correlation_id, attempts"
    before = await scalar(engine, f"SELECT row({columns})::text FROM jobs")

    stranger = public_key_text(X25519PrivateKey.generate())
    for collector, key in (("intruder", stranger), ("test-collector", stranger)):
        # the job id is a public Kafka key; the second one also names the same collector
        await processor.process(start(settings, "lapsed", collector=collector, public_key=key))
        refused = (await replies(engine, settings, "lapsed"))[-1]
        assert (refused["type"], refused.get("reason")) == ("job.rejected", "not_yours"), refused
        assert await scalar(engine, f"SELECT row({columns})::text FROM jobs") == before
        assert await scalar(engine, "SELECT count(*) FROM job_grants") == 1

    await processor.process(start(settings, "lapsed"))  # its own collector, with its own key
    again = (await replies(engine, settings, "lapsed"))[-1]
    assert again["type"] == "job.granted" and lease_fields(again)["lease_secret"]


# --- a reused correlation id, through the real SDK and broker ------------------------------


async def send_request(
    settings: Settings, body: dict[str, Any], correlation_id: str, reply_partition: int | None
) -> None:
    """A request as any writer of ``qm.requests`` can send it, headers of its choosing."""
    headers = [("correlation_id", correlation_id.encode()),
               ("reply_to", settings.topic("replies").encode())]  # fmt: skip
    if reply_partition is not None:
        headers.append(("qm.reply_partition", str(reply_partition).encode()))
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("requests"),
            json.dumps(body).encode(),
            key=body["job_id"].encode(),
            headers=headers,
        )
    finally:
        await producer.stop()


async def reply_seen(settings: Settings, partition: int, request_id: str) -> dict[str, Any]:
    """The reply to ``request_id`` on the replies topic's ``partition``, read from its start."""
    options = client_options(settings)
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        where = TopicPartition(settings.topic("replies"), partition)
        consumer.assign([where])
        await consumer.seek_to_beginning(where)
        async with asyncio.timeout(DEADLINE):
            while True:
                batch = await consumer.getmany(where, timeout_ms=500)
                for record in batch.get(where, []):
                    reply = json.loads(record.value or b"{}")
                    if reply.get("request_id") == request_id:
                        return dict(reply)
    finally:
        await consumer.stop()


@pytest.mark.parametrize("target", ["another_job", "the_same_job"])
async def test_a_request_reusing_a_holders_correlation_id_does_not_end_its_sdk_job(
    topics: Settings, engine: AsyncEngine, target: str
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=2, lease_seconds=300)
    with QmProcess(settings, "all"):
        async with (
            sdk_client(settings) as client,
            client.job(site="board", lease_seconds=300, timeout=30) as job,
        ):
            partition = client.reply_partition
            assert partition is not None
            # the grant's correlation id header, as every reader of the replies topic sees it
            watched = job._start_request_id
            hostile_job = job.job_id
            if target == "another_job":  # a running job of the hostile collector's own
                hostile_job = f"hostile-{uuid.uuid4().hex[:8]}"
                own = {"type": "job.start", "v": 1, "request_id": str(uuid.uuid4()),
                       "job_id": hostile_job, "site": "board", "collector": "hostile",
                       "needs": {"account": False},
                       "public_key": public_key_text(X25519PrivateKey.generate())}  # fmt: skip
                await send_request(settings, own, own["request_id"], partition)
                granted = await reply_seen(settings, partition, own["request_id"])
                assert granted["type"] == "job.granted", granted
            # a cancel of a running job without its token: job.lease_lost, under the contract
            # before and after the lease secret, here with the holder's correlation id
            hostile_id = str(uuid.uuid4())
            body = {"type": "job.cancel", "v": 1, "request_id": hostile_id, "job_id": hostile_job}
            await send_request(settings, body, watched, partition)
            lost = await reply_seen(settings, partition, hostile_id)
            assert lost["type"] == "job.lease_lost", lost

            # a request of the client's own, sent after that reply was written: its reply comes
            # later on the same partition, so the client has read the hostile one by then
            barrier = JobCancel(request_id=uuid.uuid4(), job_id=f"barrier-{uuid.uuid4().hex[:8]}")
            assert (await client.request(barrier, timeout=30)).type == "job.rejected"
            assert not job.lost, job.lost_reason
        assert job.status == "SUCCEEDED"  # the holder's own finish went through
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = :id", id=job.job_id) == (
        "SUCCEEDED"
    )
