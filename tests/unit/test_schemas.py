"""The wire contract: strict requests, clear errors, exported JSON Schema."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from pydantic import ValidationError

from app.errors import Disposition, InvalidMessage, classify, describe
from schemas.messages import JobStart, json_schemas, parse_reply, parse_request

KEY = base64.b64encode(bytes([9]) + bytes(31)).decode()  # X25519's base point: a usable key


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


P = 2**255 - 19  # X25519's prime
# every point of small order libsodium blocks, by u: 0, 1, the two of order 8, p - 1, p, p + 1
# (p and p + 1 are non-canonical encodings of 0 and 1); then the same with the ignored top bit set
SMALL_ORDER = [
    0,
    1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
    P - 1,
    P,
    P + 1,
]
REFUSED_KEYS = SMALL_ORDER + [u + 2**255 for u in SMALL_ORDER]


@pytest.mark.parametrize("u", REFUSED_KEYS, ids=lambda u: hex(u)[:10])
def test_public_keys_x25519_refuses_are_invalid_in_every_encoding(u: int) -> None:
    key = base64.b64encode(u.to_bytes(32, "little")).decode()
    with pytest.raises(ValidationError, match="public_key") as caught:
        parse_request(body(public_key=key))
    assert classify(caught.value) is Disposition.INVALID


def test_a_public_key_of_a_real_collector_is_accepted() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from app.sealing import public_key_text

    for _ in range(20):
        key = public_key_text(X25519PrivateKey.generate())
        assert isinstance(parse_request(body(public_key=key)), JobStart)


def follow_up(type_: str, **fields: object) -> bytes:
    return json.dumps({"type": type_, "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
                       "lease_secret": SECRET, **fields}).encode()  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        follow_up("job.heartbeat", lease_token=2**63),
        follow_up("job.heartbeat", lease_token=10**400),
        follow_up("job.heartbeat", lease_token=1, extend_seconds=2**31),
        follow_up("job.cancel", lease_token=2**63),
        follow_up("seeds.claim", lease_token=1, limit=2**63),
        follow_up("job.finish", lease_token=1, outcome="failed", cooldown_seconds=2**31),
        capture(size=2**63),
        capture(lease_token=2**64),
        body(wait_seconds=2**31),
        body(lease_seconds=2**40),
    ],
)
def test_integers_past_their_columns_are_invalid(raw: bytes) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_request(raw)
    assert classify(caught.value) is Disposition.INVALID


def test_integers_at_their_columns_bounds_are_accepted() -> None:
    parse_request(follow_up("job.heartbeat", lease_token=2**63 - 1))
    parse_request(capture(size=2**63 - 1))


def finish_with(seed_id: object) -> bytes:
    results = [{"seed_id": seed_id, "ok": True}]
    return follow_up("job.finish", lease_token=1, outcome="succeeded", seed_results=results)


@pytest.mark.parametrize(
    "seed_id", ["\u00b2", "\uff11", "\u0661", "9" * 40, str(2**63), "-1", "+1", " 1", "1.0", "", 7]
)
def test_seed_ids_are_ascii_digits_of_a_bigint(seed_id: object) -> None:
    with pytest.raises(ValidationError, match="seed_id") as caught:
        parse_request(finish_with(seed_id))
    assert classify(caught.value) is Disposition.INVALID


@pytest.mark.parametrize("seed_id", ["0", "17", str(2**63 - 1)])
def test_seed_ids_within_bigint_are_accepted(seed_id: str) -> None:
    parse_request(finish_with(seed_id))
