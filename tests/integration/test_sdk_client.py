"""The collector SDK against the real broker, answered by a scripted stand-in for the claim worker.

The responder reads ``<prefix>requests`` and answers on the request's ``reply_to`` topic (on the
partition its ``qm.reply_partition`` header names, if any) with the
``correlation_id`` and ``qm.message_id`` headers Quartermaster's relay sets, so what is tested here is
the SDK's own behaviour: the queued → granted wait, timeouts, the release of a late grant,
heartbeats, lease loss, duplicates, and the secret.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from app.kafka import client_options, producer_options, sdk_client
from app.sdk import JobRejected, QuartermasterClient, RequestTimeout
from app.sealing import load_public_key, seal
from app.settings import Settings
from schemas.messages import (
    GrantedAccount,
    GrantedSeed,
    GrantedSession,
    JobCancel,
    JobExtended,
    JobFinished,
    JobGranted,
    JobLeaseLost,
    JobQueued,
    Message,
    seal_context,
)
from schemas.messages import JobRejected as Rejected

SECRET = "s3cret-pa55word"
LEASE_SECRET = "L" * 43  # the lease secret every grant here carries, sealed
DEADLINE = 15.0


@dataclass
class Received:
    body: dict[str, Any]
    correlation_id: str
    reply_to: str
    at: float
    reply_partition: int | None = None

    @property
    def type(self) -> str:
        return str(self.body["type"])


Script = Callable[["Responder", Received], Awaitable[None]]


class Responder:
    """Reads every request of the test's topic and runs ``script`` on each, concurrently."""

    def __init__(self, settings: Settings, script: Script) -> None:
        self.settings = settings
        self.script = script
        self.received: list[Received] = []
        self.replied: list[tuple[str, float]] = []  # (reply type, when)
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Responder:
        self.producer = AIOKafkaProducer(**producer_options(self.settings))
        self.consumer = AIOKafkaConsumer(
            **client_options(self.settings), group_id=None, auto_offset_reset="earliest"
        )
        await self.producer.start()
        await self.consumer.start()
        topic = self.settings.topic("requests")
        partitions = await self.producer.partitions_for(topic)
        self.consumer.assign([TopicPartition(topic, p) for p in partitions])
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        for task in (self._reader, *self._tasks):
            task.cancel()
        await asyncio.gather(self._reader, *self._tasks, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        async for record in self.consumer:
            headers = {name: value.decode() for name, value in record.headers}
            request = Received(
                json.loads(record.value or b"{}"),
                headers["correlation_id"],
                headers["reply_to"],
                loop.time(),
                int(headers["qm.reply_partition"]) if "qm.reply_partition" in headers else None,
            )
            self.received.append(request)
            task = asyncio.create_task(self.script(self, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def reply(
        self,
        request: Received,
        reply: Message,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        await self.producer.send_and_wait(
            request.reply_to,
            reply.model_dump_json().encode(),
            key=str(request.body["job_id"]).encode(),
            partition=request.reply_partition,
            headers=[
                ("qm.message_id", (message_id or str(uuid.uuid4())).encode()),
                ("correlation_id", (correlation_id or request.correlation_id).encode()),
            ],
        )
        self.replied.append((str(getattr(reply, "type", "")), asyncio.get_running_loop().time()))

    def of_type(self, kind: str) -> list[Received]:
        return [r for r in self.received if r.type == kind]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - conditions span the SDK and the responder
                await asyncio.sleep(0.02)


def grant(
    settings: Settings, request: Received, lease_token: int = 7, lease_seconds: float = 60
) -> JobGranted:
    """A grant as Quartermaster makes it: sealed to the public key of the start request."""
    # a start from before the client existed has no key: seal to a stranger's
    public_key = request.body.get("public_key") or QuartermasterClient("127.0.0.1:1").public_key
    requester = load_public_key(public_key)
    job_id = request.body["job_id"]
    state = b'{"cookies":[],"origins":[]}'
    return JobGranted(
        request_id=request.body["request_id"],
        job_id=job_id,
        lease_token=lease_token,
        lease_secret=seal(requester, LEASE_SECRET.encode(), seal_context("lease.secret", job_id)),
        granted_at=datetime.now(UTC),
        lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_seconds),
        account=GrantedAccount(
            id="acc-1",
            username="alice",
            secret=seal(requester, SECRET.encode(), seal_context("account.secret", job_id)),
        ),
        session=GrantedSession(
            version=3,
            storage_state=seal(requester, state, seal_context("session.storage_state", job_id)),
        ),
        seeds=[GrantedSeed(id="seed-1", url="https://example.org/board/1")],
    )


def finished(request: Received) -> JobFinished:
    return JobFinished(
        request_id=request.body["request_id"], job_id=request.body["job_id"], status="SUCCEEDED"
    )


@pytest.fixture
async def client(topics: Settings) -> AsyncIterator[QuartermasterClient]:
    async with sdk_client(topics, request_timeout=5.0) as qm:
        yield qm


async def test_a_queued_start_is_granted_later_with_the_secret_decrypted_and_never_printed(
    topics: Settings, client: QuartermasterClient
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        if request.type == "job.start":
            queued = JobQueued(
                request_id=request.body["request_id"], job_id=request.body["job_id"], position=2
            )
            await responder.reply(request, queued)
            await asyncio.sleep(0.8)  # longer than the client's timeout: queued lengthens the wait
            await responder.reply(request, grant(topics, request))
        elif request.type == "job.finish":
            await responder.reply(request, finished(request))

    async with (
        Responder(topics, script) as responder,
        client.job(site="example", lease_seconds=60, wait_seconds=5, timeout=0.5) as job,
    ):
        assert job.account is not None
        assert job.account.secret.get_secret_value() == SECRET
        assert (job.account.id, job.account.username, job.lease_token) == ("acc-1", "alice", 7)
        assert job.session is not None and job.session.version == 3
        assert job.session.state() == {"cookies": [], "origins": []}
        assert [seed.url for seed in job.seeds] == ["https://example.org/board/1"]
        printed = f"{job!r} {job} {job.account!r} {job.account}"
        assert SECRET not in printed

    [finish] = responder.of_type("job.finish")
    assert (finish.body["outcome"], finish.body["lease_token"]) == ("succeeded", 7)
    assert finish.body["lease_secret"] == LEASE_SECRET  # opened from the grant
    assert job.status == "SUCCEEDED"


async def test_a_rejected_start_raises_job_rejected_with_the_reason(
    topics: Settings, client: QuartermasterClient
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        body = request.body
        rejected = Rejected(
            request_id=body["request_id"], job_id=body["job_id"], reason="no_accounts"
        )
        await responder.reply(request, rejected)

    async with Responder(topics, script):
        with pytest.raises(JobRejected) as raised:
            async with client.job(site="example"):
                pytest.fail("the body must not run")
    assert raised.value.reason == "no_accounts"


async def test_a_start_nobody_answers_raises_timeout_error_and_cancels_the_job(
    topics: Settings, client: QuartermasterClient
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        return None

    async with Responder(topics, script) as responder:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError) as raised:
            async with client.job(site="example", job_id="job-silent", timeout=0.5):
                pytest.fail("the body must not run")
        assert loop.time() - began < 3
        assert isinstance(raised.value, RequestTimeout)
        await responder.wait_until(lambda: bool(responder.of_type("job.cancel")))

    [cancel] = responder.of_type("job.cancel")
    assert cancel.body["job_id"] == "job-silent"


async def test_a_grant_after_the_caller_gave_up_is_released_once_with_a_cancel(
    topics: Settings, client: QuartermasterClient
) -> None:
    granted_at: list[float] = []

    async def script(responder: Responder, request: Received) -> None:
        if request.type != "job.start":
            return
        await asyncio.sleep(1.0)
        late = grant(topics, request)
        message_id = str(uuid.uuid4())
        granted_at.append(asyncio.get_running_loop().time())
        await responder.reply(request, late, message_id=message_id)
        await responder.reply(request, late, message_id=message_id)  # the relay's republish

    async with Responder(topics, script) as responder:
        with pytest.raises(RequestTimeout):
            async with client.job(site="example", job_id="job-late", timeout=0.3):
                pytest.fail("the body must not run")

        def released() -> list[Received]:
            return [
                c for c in responder.of_type("job.cancel") if granted_at and c.at > granted_at[0]
            ]

        await responder.wait_until(lambda: bool(released()))
        await asyncio.sleep(0.5)  # room for a second, wrong, release of the duplicate

    assert [c.body["job_id"] for c in released()] == ["job-late"]
    start_request_id = responder.of_type("job.start")[0].body["request_id"]
    assert released()[0].body["request_id"] != start_request_id
    assert (released()[0].body["lease_token"], released()[0].body["lease_secret"]) == (
        7,
        LEASE_SECRET,
    )


async def test_heartbeats_extend_the_lease_with_the_lease_token(
    topics: Settings, client: QuartermasterClient
) -> None:
    extended_to = datetime(2031, 1, 1, tzinfo=UTC)

    async def script(responder: Responder, request: Received) -> None:
        body = request.body
        if request.type == "job.start":
            await responder.reply(request, grant(topics, request, lease_token=11, lease_seconds=1))
        elif request.type == "job.heartbeat":
            extended = JobExtended(
                request_id=body["request_id"], job_id=body["job_id"], lease_expires_at=extended_to
            )
            await responder.reply(request, extended)
        elif request.type == "job.finish":
            await responder.reply(request, finished(request))

    async with (
        Responder(topics, script) as responder,
        client.job(site="example", lease_seconds=1) as job,
    ):
        await responder.wait_until(lambda: len(responder.of_type("job.heartbeat")) >= 2)
        await responder.wait_until(lambda: job.lease_expires_at == extended_to)

    beats = responder.of_type("job.heartbeat")
    assert {b.body["lease_token"] for b in beats} == {11}
    assert {b.body["lease_secret"] for b in beats} == {LEASE_SECRET}
    assert {b.body["extend_seconds"] for b in beats} == {1}
    assert not job.lost


async def test_a_lost_lease_sets_lost_stops_heartbeats_and_sends_no_finish(
    topics: Settings, client: QuartermasterClient
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        body = request.body
        if request.type == "job.start":
            await responder.reply(request, grant(topics, request, lease_seconds=1))
        elif request.type == "job.heartbeat":
            lost = JobLeaseLost(
                request_id=body["request_id"], job_id=body["job_id"], reason="lease_expired"
            )
            await responder.reply(request, lost)

    async with Responder(topics, script) as responder:
        async with client.job(site="example", lease_seconds=1) as job:
            await responder.wait_until(lambda: job.lost)
            await asyncio.sleep(0.8)  # more than two heartbeat intervals
        assert (job.lost, job.lost_reason) == (True, "lease_expired")
        assert len(responder.of_type("job.heartbeat")) == 1
        # a marker on the job's own key: a finish sent on exit would have reached the responder first
        await client.send(JobCancel(request_id=uuid.uuid4(), job_id=job.job_id))
        await responder.wait_until(lambda: bool(responder.of_type("job.cancel")))
        assert responder.of_type("job.finish") == []


async def test_foreign_and_duplicate_replies_are_ignored(
    topics: Settings, client: QuartermasterClient
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        body = request.body
        if request.type == "job.start":
            # Another collector's grant; then ours: queued, a "republish" of it (same message_id,
            # different body, so a delivered duplicate would show), and the grant.
            await responder.reply(
                request, grant(topics, request, lease_token=99), correlation_id=str(uuid.uuid4())
            )
            queued = JobQueued(request_id=body["request_id"], job_id=body["job_id"], position=1)
            message_id = str(uuid.uuid4())
            await responder.reply(request, queued, message_id=message_id)
            rejected = Rejected(request_id=body["request_id"], job_id=body["job_id"], reason="x")
            await responder.reply(request, rejected, message_id=message_id)
            await responder.reply(request, grant(topics, request, lease_token=8))
        elif request.type == "job.finish":
            await responder.reply(request, finished(request))
            await responder.reply(request, finished(request))

    async with (
        Responder(topics, script) as responder,
        client.job(site="example", wait_seconds=5) as job,
    ):
        assert job.lease_token == 8

    assert len(responder.of_type("job.finish")) == 1
    assert job.status == "SUCCEEDED"


async def test_replies_written_before_the_client_started_are_not_read(topics: Settings) -> None:
    request_id = uuid.uuid4()
    stale = Received(
        {"request_id": str(request_id), "job_id": "job-old"},
        str(request_id),
        topics.topic("replies"),
        0.0,
    )

    async def script(responder: Responder, request: Received) -> None:
        body = request.body
        rejected = Rejected(request_id=body["request_id"], job_id=body["job_id"], reason="fresh")
        await responder.reply(request, rejected)

    async with Responder(topics, script) as responder:
        await responder.reply(stale, grant(topics, stale))  # sits on the topic before the client
        async with sdk_client(topics, request_timeout=5.0) as qm:
            from schemas.messages import JobStart

            start = JobStart(
                request_id=request_id,
                job_id="job-old",
                site="example",
                collector="c",
                public_key=qm.public_key,
            )
            reply = await qm.request(start)

    assert isinstance(reply, Rejected) and reply.reason == "fresh"


async def test_collectors_share_the_reply_topic_each_on_one_partition_and_no_group(
    topics: Settings,
) -> None:
    async def script(responder: Responder, request: Received) -> None:
        if request.type == "job.start":
            token = int(request.body["job_id"].rsplit("-", 1)[1])
            await responder.reply(request, grant(topics, request, lease_token=token))
        elif request.type == "job.finish":
            await responder.reply(request, finished(request))

    async def collect(qm: QuartermasterClient, number: int) -> int:
        async with qm.job(site="example", job_id=f"job-{number}") as job:
            return job.lease_token

    async with (
        Responder(topics, script) as responder,
        sdk_client(topics, request_timeout=5.0) as one,
        sdk_client(topics, request_timeout=5.0) as two,
    ):
        tokens = await asyncio.gather(*(collect((one, two)[n % 2], n) for n in range(1, 9)))
        for qm in (one, two):
            assert qm._consumer is not None and qm.reply_partition is not None
            assignment = {tp.partition for tp in qm._consumer.assignment()}
            assert assignment == {qm.reply_partition}
        requests = responder.received
        assert {r.reply_partition for r in requests if r.body["job_id"] == "job-1"} == {
            two.reply_partition
        }

    assert tokens == list(range(1, 9))
