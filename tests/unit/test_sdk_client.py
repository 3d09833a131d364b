"""The SDK client's request/reply logic, with a recording producer in place of Kafka.

The real broker is exercised in tests/integration/test_sdk_client.py; here the timing rules are
checked quickly: waiting through job.queued, timing out, releasing what the caller gave up on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.kafka import sdk_client
from app.sdk import (
    ClientClosed,
    QuartermasterClient,
    QuartermasterError,
    RequestFailed,
    RequestTimeout,
)
from app.sealing import load_public_key, public_key_text, seal
from app.settings import Settings
from schemas.messages import (
    JobGranted,
    JobHeartbeat,
    JobQueued,
    JobRejected,
    JobStart,
    seal_context,
)
from schemas.messages import RequestFailed as RequestFailedReply

Responder = Callable[[dict[str, Any], str], None]

CLIENT_KEY = X25519PrivateKey.generate()  # the client fixture's own key
PUBLIC_KEY = public_key_text(CLIENT_KEY)
LEASE_SECRET = "S" * 43


class RecordingProducer:
    """Stands in for AIOKafkaProducer: records what is sent, lets a test answer it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any], dict[str, str]]] = []
        self.respond: Responder | None = None

    async def send_and_wait(
        self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        body = json.loads(value)
        named = {name: raw.decode() for name, raw in headers}
        self.sent.append((topic, key, body, named))
        if self.respond is not None:
            asyncio.get_running_loop().call_soon(self.respond, body, named["correlation_id"])

    async def stop(self) -> None:
        return None

    def types(self) -> list[str]:
        return [body["type"] for _, _, body, _ in self.sent]


@pytest.fixture
def producer() -> RecordingProducer:
    return RecordingProducer()


@pytest.fixture
def client(producer: RecordingProducer) -> QuartermasterClient:
    qm = QuartermasterClient(
        "127.0.0.1:1", topic_prefix="p.", request_timeout=0.3, private_key=CLIENT_KEY
    )
    qm._producer = producer  # type: ignore[assignment]
    return qm


def reply_headers(correlation_id: str) -> list[tuple[str, bytes]]:
    return [
        ("correlation_id", correlation_id.encode()),
        ("qm.message_id", str(uuid.uuid4()).encode()),
    ]


def start(wait_seconds: int = 0) -> JobStart:
    return JobStart(
        request_id=uuid.uuid4(),
        job_id="job-1",
        site="example",
        collector="c",
        wait_seconds=wait_seconds,
        public_key=PUBLIC_KEY,
    )


def grant_for(message: dict[str, Any]) -> bytes:
    return (
        JobGranted(
            request_id=message["request_id"],
            job_id=message["job_id"],
            lease_token=1,
            lease_secret=seal(
                load_public_key(PUBLIC_KEY),
                LEASE_SECRET.encode(),
                seal_context("lease.secret", message["job_id"]),
            ),
            granted_at=datetime(2030, 1, 1, tzinfo=UTC),
            lease_expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
        .model_dump_json()
        .encode()
    )


async def drain(client: QuartermasterClient) -> None:
    """Let the client's background releases run."""
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.gather(*client._background)


async def test_request_is_keyed_by_job_id_with_correlation_and_reply_headers(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    producer.respond = lambda body, cid: client.on_reply(reply_headers(cid), grant_for(body))
    message = start()

    reply = await client.request(message)

    assert isinstance(reply, JobGranted)
    topic, key, body, headers = producer.sent[0]
    assert (topic, key) == ("p.requests", b"job-1")
    assert body["type"] == "job.start" and body["request_id"] == str(message.request_id)
    assert headers == {"correlation_id": str(message.request_id), "reply_to": "p.replies"}


async def test_a_queued_start_is_waited_on_past_the_timeout_up_to_wait_seconds(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    def answer(body: dict[str, Any], cid: str) -> None:
        queued = JobQueued(request_id=body["request_id"], job_id=body["job_id"], position=1)
        client.on_reply(reply_headers(cid), queued.model_dump_json().encode())
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, client.on_reply, reply_headers(cid), grant_for(body))

    producer.respond = answer

    reply = await client.request(start(wait_seconds=2), timeout=0.3)

    assert isinstance(reply, JobGranted)
    assert producer.types() == ["job.start"]


async def test_a_start_without_answer_raises_a_timeout_error_and_is_cancelled(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    with pytest.raises(TimeoutError) as raised:
        await client.request(start(wait_seconds=5), timeout=0.2)

    assert isinstance(raised.value, RequestTimeout)
    await drain(client)
    assert producer.types() == ["job.start", "job.cancel"]
    assert producer.sent[1][1] == b"job-1"


async def test_a_queued_start_whose_caller_is_cancelled_is_cancelled_at_the_server(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    producer.respond = lambda body, cid: client.on_reply(
        reply_headers(cid),
        JobQueued(request_id=body["request_id"], job_id=body["job_id"], position=2)
        .model_dump_json()
        .encode(),
    )
    caller = asyncio.create_task(client.request(start(wait_seconds=60)))
    async with asyncio.timeout(5):  # until the start went out and its job.queued came back
        while producer.types() != ["job.start"]:  # noqa: ASYNC110 - the recorder has no event
            await asyncio.sleep(0)

    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    await drain(client)
    assert producer.types() == ["job.start", "job.cancel"]


async def test_a_grant_after_the_caller_gave_up_is_released_with_a_cancel(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    message = start()
    with pytest.raises(RequestTimeout):
        await client.request(message, timeout=0.05)
    await drain(client)
    producer.sent.clear()

    cid = str(message.request_id)
    late = grant_for(json.loads(message.model_dump_json()))
    headers = reply_headers(cid)
    client.on_reply(headers, late)
    client.on_reply(headers, late)  # the relay's republish: same message_id
    await drain(client)

    assert producer.types() == ["job.cancel"]
    body = producer.sent[0][2]
    assert body["job_id"] == "job-1" and body["request_id"] != cid
    assert (body["lease_token"], body["lease_secret"]) == (1, LEASE_SECRET)  # opened to cancel


async def test_a_heartbeat_that_times_out_is_not_followed_by_a_cancel(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    heartbeat = JobHeartbeat(
        request_id=uuid.uuid4(), job_id="job-1", lease_token=3, lease_secret=LEASE_SECRET
    )
    with pytest.raises(RequestTimeout):
        await client.request(heartbeat, timeout=0.05)
    await drain(client)
    assert producer.types() == ["job.heartbeat"]


async def test_a_rejection_is_returned_as_the_final_reply(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    producer.respond = lambda body, cid: client.on_reply(
        reply_headers(cid),
        JobRejected(request_id=body["request_id"], job_id=body["job_id"], reason="no_accounts")
        .model_dump_json()
        .encode(),
    )
    reply = await client.request(start())
    assert isinstance(reply, JobRejected) and reply.reason == "no_accounts"


def failed_for(body: dict[str, Any]) -> bytes:
    failed = RequestFailedReply(
        request_id=body["request_id"], job_id=body["job_id"], error_class="MissingKey"
    )
    return failed.model_dump_json().encode()


async def test_request_failed_raises_and_a_grant_after_a_replay_is_released(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    producer.respond = lambda body, cid: client.on_reply(reply_headers(cid), failed_for(body))
    message = start()

    with pytest.raises(RequestFailed) as raised:
        await client.request(message)

    assert isinstance(raised.value, QuartermasterError)
    assert raised.value.error_class == "MissingKey" and raised.value.job_id == "job-1"
    await drain(client)
    assert producer.types() == ["job.start", "job.cancel"]  # its caller gave up, as on a timeout
    producer.sent.clear()
    # an operator replays the start's dead letter once the cause is fixed: its grant is released
    late = grant_for(json.loads(message.model_dump_json()))
    client.on_reply(reply_headers(str(message.request_id)), late)
    await drain(client)
    assert producer.types() == ["job.cancel"]
    assert (producer.sent[0][2]["lease_token"], producer.sent[0][2]["lease_secret"]) == (
        1,
        LEASE_SECRET,
    )


async def test_request_failed_for_a_heartbeat_raises_and_releases_nothing(
    client: QuartermasterClient, producer: RecordingProducer
) -> None:
    producer.respond = lambda body, cid: client.on_reply(reply_headers(cid), failed_for(body))
    heartbeat = JobHeartbeat(
        request_id=uuid.uuid4(), job_id="job-1", lease_token=3, lease_secret=LEASE_SECRET
    )

    with pytest.raises(RequestFailed):
        await client.request(heartbeat)
    await drain(client)
    assert producer.types() == ["job.heartbeat"]


async def test_a_request_before_start_or_after_close_raises_client_closed() -> None:
    qm = QuartermasterClient("127.0.0.1:1")
    with pytest.raises(ClientClosed):
        await qm.request(start())
    await qm.close()
    with pytest.raises(ClientClosed):
        await qm.start()


def test_from_settings_takes_prefix_and_security() -> None:
    settings = Settings(
        kafka_bootstrap_servers="k1:9093",
        topic_prefix="x.",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="qm",
        kafka_sasl_password="pw",
    )

    qm = sdk_client(settings, collector="crawler-1")

    assert qm.bootstrap_servers == "k1:9093"
    assert (qm.request_topic, qm.reply_topic) == ("x.requests", "x.replies")
    assert qm._security["sasl_plain_username"] == "qm"
    assert qm.collector == "crawler-1"
    assert "pw" not in repr(qm)


def test_every_client_has_a_key_pair_of_its_own() -> None:
    one, two = QuartermasterClient("127.0.0.1:1"), QuartermasterClient("127.0.0.1:1")
    assert one.public_key != two.public_key
    assert len(base64.b64decode(one.public_key)) == 32


def test_an_explicit_reply_topic_is_used() -> None:
    qm = QuartermasterClient("127.0.0.1:1", reply_topic="crawler-7.replies")
    assert qm.reply_topic == "crawler-7.replies" and qm.request_topic == "qm.requests"
