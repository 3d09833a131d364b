"""Every value the SDK checks is refused with a ``QuartermasterError`` (``InvalidArgument``), as
docs/sdk.md promises, never with the validation library's own error, and before anything is sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from app.sdk import InvalidArgument, Job, QuartermasterClient, QuartermasterError
from tests.unit.test_sdk_client import RecordingProducer
from tests.unit.test_sdk_job import Server


@pytest.fixture
def server() -> Server:
    """A client whose requests a fake Quartermaster answers (grants, finishes)."""
    producer = RecordingProducer()
    client = QuartermasterClient("127.0.0.1:1", request_timeout=1.0)
    client._producer = producer  # type: ignore[assignment]
    return Server(client, producer)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"lease_seconds": -5}, "lease_seconds"),
        ({"wait_seconds": -1}, "wait_seconds"),
        ({"seeds": 1000}, "seeds"),
        ({"site": ""}, "site"),
    ],
)
async def test_newcomer_client_job_refuses_a_bad_value_with_a_quartermaster_error(
    server: Server, options: dict[str, Any], named: str
) -> None:
    with pytest.raises(QuartermasterError) as raised:
        server.client.job(**{"site": "example", **options})
    assert isinstance(raised.value, InvalidArgument) and isinstance(raised.value, ValueError)
    assert not isinstance(raised.value, ValidationError)
    assert str(raised.value).startswith(f"client.job: {named}: "), raised.value
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert server.producer.types() == []  # nothing was sent


def test_newcomer_a_reply_partition_that_cannot_be_one_is_a_quartermaster_error() -> None:
    with pytest.raises(InvalidArgument, match="reply_partition"):
        QuartermasterClient("127.0.0.1:1", reply_partition=-1)


Call = Callable[[Job], Awaitable[object] | object]

IN_THE_BODY: dict[str, Call] = {
    "job.blocked": lambda job: job.blocked("captcha", cooldown_seconds=-1),
    "job.seed_done": lambda job: job.seed_done("not-a-seed-id", ok=True),
    "job.set_session_state": lambda job: job.set_session_state(["no"]),  # type: ignore[arg-type]
    "job.claim_seeds": lambda job: job.claim_seeds(0),
    "job.heartbeat": lambda job: job.heartbeat(extend_seconds=-5),
    "job.upload_session": lambda job: job.upload_session("cookies=secret"),  # type: ignore[arg-type]
    "job.submit_capture": lambda job: job.submit_capture(
        url="https://example.com/",
        storage_uri="s3://b/k",
        sha256="no",
        content_type="text/html",
        size=-1,
    ),
}


@pytest.mark.parametrize(
    "options",
    [{"on_dead_session": "retry"}, {"storage_state": {}}],
    ids=["on_dead_session", "storage_state"],
)
async def test_newcomer_a_browser_context_with_a_bad_option_is_a_quartermaster_error(
    server: Server, options: dict[str, Any]
) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        with pytest.raises(InvalidArgument) as raised:
            async with job.browser_context(object(), **options):  # type: ignore[arg-type]
                pytest.fail("the body must not run")
        assert str(raised.value).startswith("job.browser_context: "), raised.value


@pytest.mark.parametrize("call", list(IN_THE_BODY))
async def test_newcomer_every_job_method_refuses_a_bad_value_with_a_quartermaster_error(
    server: Server, call: str
) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        sent = len(server.producer.types())
        with pytest.raises(InvalidArgument) as raised:
            outcome = IN_THE_BODY[call](job)
            if isinstance(outcome, Awaitable):
                await outcome
        assert str(raised.value).startswith(f"{call}: "), raised.value
        assert "secret" not in str(raised.value)  # what was given is never repeated
        assert len(server.producer.types()) == sent
    assert server.producer.types()[-1] == "job.finish"
    assert server.producer.sent[-1][2]["outcome"] == "succeeded"  # the job still ends well
