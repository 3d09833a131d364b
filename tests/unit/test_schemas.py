"""The wire contract: strict requests, clear errors, exported JSON Schema."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from pydantic import ValidationError

from app.errors import Disposition, InvalidMessage, classify, describe
from schemas.messages import JobStart, json_schemas, parse_reply, parse_request

KEY = base64.b64encode(bytes(32)).decode()


def body(**fields: object) -> bytes:
    base = {"type": "job.start", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j-1",
            "site": "board", "collector": "c", "public_key": KEY}  # fmt: skip
    return json.dumps({**base, **fields}).encode()


def test_every_start_needs_a_public_key_since_every_grant_seals_its_lease_secret() -> None:
    with pytest.raises(ValidationError, match="public_key"):
        parse_request(body(public_key=None, needs={"account": False, "seeds": 1}))
    without = json.loads(body(needs={"account": False}))
    del without["public_key"]
    with pytest.raises(ValidationError, match="public_key"):
        parse_request(json.dumps(without).encode())


SECRET = "A" * 43  # the shape of a lease secret: URL-safe base64 of 32 bytes


def heartbeat(**fields: object) -> bytes:
    base = {"type": "job.heartbeat", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j-1",
            "lease_token": 7, "lease_secret": SECRET}  # fmt: skip
    return json.dumps(
        {key: value for key, value in {**base, **fields}.items() if value is not None}
    ).encode()


def test_a_follow_up_presents_the_lease_secret_in_its_bounded_shape() -> None:
    assert parse_request(heartbeat()).lease_secret == SECRET  # type: ignore[union-attr]
    for bad in (None, "", "short", "A" * 129, "A" * 42 + "=", "A" * 42 + "/", "A" * 42 + " "):
        with pytest.raises(ValidationError) as caught:
            parse_request(heartbeat(lease_secret=bad))
        assert classify(caught.value) is Disposition.INVALID
        assert "lease_secret" in describe(caught.value)
        assert not bad or bad not in describe(caught.value)  # never echoed


def test_a_cancel_may_come_without_token_and_secret_for_a_waiting_job() -> None:
    raw = json.dumps({"type": "job.cancel", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j"})
    request = parse_request(raw.encode())
    assert request.lease_token is None and request.lease_secret is None  # type: ignore[union-attr]


def test_a_valid_start_parses_with_defaults() -> None:
    request = parse_request(body())
    assert isinstance(request, JobStart)
    assert request.needs.account and request.needs.seeds == 0 and request.wait_seconds == 0


@pytest.mark.parametrize(
    "raw",
    [
        body(surprise=1),  # unknown field
        body(type="job.explode"),  # unknown type
        body(v=2),  # unknown version
        body(request_id="not-a-uuid"),
        body(site="Not A Slug"),
        body(lease_seconds=0),
        body(needs={"account": True, "seeds": 1000}),
        body(public_key=None),  # an account is only ever sent sealed to the requester
        body(public_key="c2hvcnQ="),  # not 32 bytes
        b"{not json",
        b"[1, 2]",
    ],
)
def test_bad_requests_are_refused_as_invalid(raw: bytes) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_request(raw)
    assert classify(caught.value) is Disposition.INVALID


def test_validation_errors_are_described_without_echoing_the_input() -> None:
    raw = json.dumps({"type": "job.finish", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
                      "lease_token": "canary-secret", "outcome": "succeeded"}).encode()  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        parse_request(raw)
    assert "canary-secret" not in describe(caught.value)
    assert "lease_token" in describe(caught.value)


def test_capture_urls_must_be_http() -> None:
    raw = json.dumps({"type": "capture.submit", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
                      "lease_token": 1, "capture_id": "c", "url": "file:///etc/passwd", "storage_uri": "s3://b/k",
                      "sha256": "0" * 64, "content_type": "text/html", "size": 1,
                      "captured_at": "2026-01-01T00:00:00Z"}).encode()  # fmt: skip
    with pytest.raises(ValidationError, match="http"):
        parse_request(raw)


def test_replies_round_trip_and_schemas_export() -> None:
    reply = parse_reply(
        b'{"type":"job.queued","v":1,"request_id":"%s","job_id":"j","position":3}'
        % str(uuid.uuid4()).encode()
    )
    assert reply.type == "job.queued"
    schemas = json_schemas()
    assert set(schemas) == {"request", "reply", "event", "job_event", "capture_ready"}
    assert "job.start" in json.dumps(schemas["request"])
    assert "quartermaster sealed box v1" in json.dumps(schemas["reply"])


def test_session_states_travel_only_sealed() -> None:
    raw = json.dumps({"type": "session.upload", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
                      "lease_token": 1, "lease_secret": SECRET, "storage_state": {"cookies": []}}).encode()  # fmt: skip
    with pytest.raises(ValidationError, match="storage_state"):
        parse_request(raw)


def test_infrastructure_errors_are_transient_and_others_unexpected() -> None:
    assert classify(ConnectionRefusedError()) is Disposition.TRANSIENT
    assert classify(TimeoutError()) is Disposition.TRANSIENT
    assert classify(InvalidMessage("too big")) is Disposition.INVALID
    assert classify(KeyError("x")) is Disposition.UNEXPECTED


def capture(**fields: object) -> bytes:
    return json.dumps(
        {"type": "capture.submit", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j-1",
         "lease_token": 1, "lease_secret": SECRET, "capture_id": "c-1", "url": "https://a.example/",
         "storage_uri": "s3://b/k", "sha256": "0" * 64, "content_type": "text/html", "size": 1,
         "captured_at": "2026-01-01T00:00:00Z", **fields}
    ).encode()  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        body(collector="c\u0000"),
        capture(meta={"deep": [{"k\u0000": 1}]}),
    ],
    ids=["field", "nested key"],
)
def test_text_with_a_nul_character_is_bad_input_with_a_reason(raw: bytes) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_request(raw)
    assert classify(caught.value) is Disposition.INVALID
    assert "NUL" in describe(caught.value)
