"""The job context manager's own logic: secret decryption, outcomes, what it never prints."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.sdk import (
    Account,
    InvalidArgument,
    JobRejected,
    NoUploadKey,
    QuartermasterClient,
    SecretUndecryptable,
)
from app.sdk.grants import open_grant
from app.sealing import load_public_key, private_key_text, public_key_text, seal, unseal_json
from schemas.messages import GrantedAccount, JobFinished, JobGranted, seal_context
from schemas.messages import JobRejected as Rejected
from tests.unit.test_sdk_client import RecordingProducer, reply_headers

SECRET = "correct-horse-battery-staple"
LEASE_SECRET = "L" * 43
QUARTERMASTER = X25519PrivateKey.generate()  # the server's sealing key


def sealed(public_key: str, job_id: str, secret: str = SECRET) -> GrantedAccount:
    context = seal_context("account.secret", job_id)
    return GrantedAccount(
        id="acc-1",
        username="alice",
        secret=seal(load_public_key(public_key), secret.encode(), context),
    )


def sealed_lease_secret(public_key: str, job_id: str) -> str:
    context = seal_context("lease.secret", job_id)
    return seal(load_public_key(public_key), LEASE_SECRET.encode(), context)


def grant(
    client: QuartermasterClient, job_id: str = "job-1", upload_key: str | None = None
) -> JobGranted:
    return JobGranted(
        request_id=uuid.uuid4(),
        job_id=job_id,
        lease_token=5,
        lease_secret=sealed_lease_secret(client.public_key, job_id),
        granted_at=datetime.now(UTC),
        lease_expires_at=datetime.now(UTC) + timedelta(seconds=60),
        upload_key=upload_key,
        account=sealed(client.public_key, job_id),
    )


def test_the_account_secret_opens_with_the_clients_own_key() -> None:
    client = QuartermasterClient("127.0.0.1:1")
    account, session = open_grant(client, grant(client))
    assert account is not None and session is None
    assert (account.id, account.username) == ("acc-1", "alice")
    assert account.secret.get_secret_value() == SECRET


def test_the_decrypted_secret_never_shows_in_repr_or_str() -> None:
    client = QuartermasterClient("127.0.0.1:1")
    account, _ = open_grant(client, grant(client))
    assert account is not None
    for text in (
        repr(account),
        str(account),
        f"{account}",
        repr(account.secret),
        str(account.secret),
    ):
        assert SECRET not in text


def test_a_secret_sealed_to_another_client_raises_secret_undecryptable() -> None:
    mine, other = QuartermasterClient("127.0.0.1:1"), QuartermasterClient("127.0.0.1:1")
    with pytest.raises(SecretUndecryptable, match="acc-1"):
        open_grant(mine, grant(other))


def test_a_secret_sealed_for_another_job_does_not_open() -> None:
    client = QuartermasterClient("127.0.0.1:1")
    moved = grant(client, job_id="job-1").model_copy(update={"job_id": "job-2"})
    with pytest.raises(SecretUndecryptable):
        open_grant(client, moved)


class Server:
    """Answers job.start with a grant and job.finish with job.finished, recording what came."""

    def __init__(
        self, client: QuartermasterClient, producer: RecordingProducer, reject: str | None = None
    ) -> None:
        self.client = client
        self.reject = reject
        self.upload_key: str | None = public_key_text(QUARTERMASTER)
        self.sealed_to: str | None = None  # seal accounts to this key instead of the requester's
        self.lease_sealed_to: str | None = None  # and lease secrets to this one
        producer.respond = self.answer
        self.producer = producer

    def answer(self, body: dict[str, Any], cid: str) -> None:
        reply: Any
        if body["type"] == "job.start" and self.reject:
            reply = Rejected(
                request_id=body["request_id"], job_id=body["job_id"], reason=self.reject
            )
        elif body["type"] == "job.start":
            reply = JobGranted(
                request_id=body["request_id"],
                job_id=body["job_id"],
                lease_token=5,
                lease_secret=sealed_lease_secret(
                    self.lease_sealed_to or body["public_key"], body["job_id"]
                ),
                granted_at=datetime.now(UTC),
                lease_expires_at=datetime.now(UTC) + timedelta(seconds=60),
                upload_key=self.upload_key,
                account=sealed(self.sealed_to or body["public_key"], body["job_id"]),
            )
        elif body["type"] == "job.finish":
            reply = JobFinished(
                request_id=body["request_id"], job_id=body["job_id"], status="SUCCEEDED"
            )
        else:
            return
        self.client.on_reply(reply_headers(cid), reply.model_dump_json().encode())

    def finish(self) -> dict[str, Any]:
        [body] = [body for _, _, body, _ in self.producer.sent if body["type"] == "job.finish"]
        return body


@pytest.fixture
def server() -> Server:
    producer = RecordingProducer()
    client = QuartermasterClient("127.0.0.1:1", request_timeout=1.0)
    client._producer = producer  # type: ignore[assignment]
    return Server(client, producer)


async def test_a_body_that_returns_finishes_succeeded_with_session_state_and_seed_results(
    server: Server,
) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        assert isinstance(job.account, Account) and job.lease_token == 5
        job.set_session_state({"cookies": [], "origins": []})
        job.report_seed("17", ok=True, next_due_seconds=3600)

    finish = server.finish()
    assert (finish["outcome"], finish["reason"], finish["lease_token"]) == ("succeeded", None, 5)
    assert finish["lease_secret"] == LEASE_SECRET  # opened from the grant
    context = seal_context("job.finish", job.job_id)
    assert unseal_json(QUARTERMASTER, finish["session_state"], context) == {
        "cookies": [],
        "origins": [],
    }
    assert finish["seed_results"] == [
        {"seed_id": "17", "ok": True, "next_due_seconds": 3600, "reason": None}
    ]
    assert job.status == "SUCCEEDED"


async def test_a_body_that_raises_finishes_failed_with_the_exception_class_name(
    server: Server,
) -> None:
    with pytest.raises(KeyError):
        async with server.client.job(site="example", lease_seconds=60):
            raise KeyError("selector")

    finish = server.finish()
    assert (finish["outcome"], finish["reason"]) == ("failed", "KeyError")


async def test_blocked_wins_over_the_exception_that_followed_it(server: Server) -> None:
    with pytest.raises(RuntimeError):
        async with server.client.job(site="example", lease_seconds=60) as job:
            job.blocked("captcha wall", cooldown_seconds=600)
            raise RuntimeError("stop")

    finish = server.finish()
    assert (finish["outcome"], finish["reason"], finish["cooldown_seconds"]) == (
        "blocked",
        "captcha wall",
        600,
    )


async def test_a_cancelled_body_still_finishes_failed(server: Server) -> None:
    entered = asyncio.Event()

    async def crawl() -> None:
        async with server.client.job(site="example", lease_seconds=60):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(crawl())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert server.finish()["reason"] == "CancelledError"


async def test_a_rejected_start_raises_job_rejected_with_its_reason(server: Server) -> None:
    server.reject = "no_accounts"
    with pytest.raises(JobRejected) as raised:
        async with server.client.job(site="example", job_id="job-42"):
            pytest.fail("the body must not run")
    assert (raised.value.reason, raised.value.job_id) == ("no_accounts", "job-42")


async def test_the_job_repr_names_ids_but_not_the_secret(server: Server) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        text = f"{job!r} {job} {job.account!r}"
    assert SECRET not in text and "acc-1" in text and job.job_id in text
    assert LEASE_SECRET not in text


async def test_session_state_that_is_not_an_object_is_refused_in_the_body(server: Server) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        with pytest.raises(InvalidArgument):
            job.set_session_state(["not", "an", "object"])  # type: ignore[arg-type]


async def test_a_grant_whose_secret_does_not_decrypt_raises_and_is_released(server: Server) -> None:
    server.sealed_to = QuartermasterClient("127.0.0.1:1").public_key
    with pytest.raises(SecretUndecryptable):
        async with server.client.job(site="example", job_id="job-9"):
            pytest.fail("the body must not run")
    await asyncio.gather(*server.client._background)

    assert server.producer.types() == ["job.start", "job.cancel"]
    cancel = server.producer.sent[1][2]
    assert (cancel["job_id"], cancel["lease_token"], cancel["lease_secret"]) == (
        "job-9",
        5,
        LEASE_SECRET,
    )


async def test_a_grant_whose_lease_secret_does_not_open_raises_and_sends_nothing_more(
    server: Server,
) -> None:
    server.lease_sealed_to = QuartermasterClient("127.0.0.1:1").public_key
    with pytest.raises(SecretUndecryptable, match="lease secret"):
        async with server.client.job(site="example", job_id="job-9"):
            pytest.fail("the body must not run")
    await asyncio.gather(*server.client._background)
    assert server.producer.types() == ["job.start"]  # nothing it could present: the lease lapses


async def test_a_session_state_without_an_upload_key_is_refused_in_the_body(
    server: Server,
) -> None:
    server.upload_key = None
    async with server.client.job(site="example", lease_seconds=60) as job:
        with pytest.raises(NoUploadKey):
            job.set_session_state({"cookies": []})


def test_a_private_key_round_trips_through_its_text() -> None:
    key = X25519PrivateKey.generate()
    assert public_key_text(key) == public_key_text(
        X25519PrivateKey.from_private_bytes(base64.b64decode(private_key_text(key)))
    )


def test_a_job_not_yet_entered_has_no_lease() -> None:
    job = QuartermasterClient("127.0.0.1:1").job(site="example", job_id=str(uuid.uuid4()))
    with pytest.raises(RuntimeError, match="not acquired"):
        _ = job.lease_token
