"""Values a hostile producer sends that pass the old patterns but no column, parser or key can
take: each is answered ``request.invalid`` at once, and the lease it named is untouched."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from tests.support.leasing import (
    lease_fields,
    make_site,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from workers.requests import RequestProcessor

BIGINT_PAST = 2**63  # one past PostgreSQL's bigint
P = 2**255 - 19  # X25519's prime: an encoding of u = p is the non-canonical form of 0


def key_text(u: int) -> str:
    """An X25519 public key of ``u`` (little-endian, as the wire carries it)."""
    return base64.b64encode(u.to_bytes(32, "little")).decode()


async def granted(processor: RequestProcessor, engine: AsyncEngine, settings: Settings) -> Any:
    """Job "one" granted on a fresh site: its ``job.granted`` reply."""
    await make_site(engine, settings, lease_seconds=60)
    await processor.process(start(settings, "one"))
    [grant] = await replies(engine, settings, "one")
    assert grant["type"] == "job.granted", grant
    return grant


async def answer(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, record: Any
) -> dict[str, Any]:
    """The reply the record got (it must get one, and at once: no retries of a bad value)."""
    before = len(await replies(engine, settings))
    outcome = await processor.process(record)
    answered = (await replies(engine, settings))[before:]
    assert len(answered) == 1, (outcome, answered)
    return answered[0]


async def assert_lease_untouched(engine: AsyncEngine, token: int) -> None:
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'one'") == "RUNNING"
    assert await scalar(engine, "SELECT lease_token FROM jobs WHERE id = 'one'") == token
    assert await scalar(engine, "SELECT status::text FROM accounts") == "USING"


async def test_a_heartbeat_with_a_lease_token_past_bigint_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted(processor, engine, settings)
    record = request(
        settings, "job.heartbeat", "one", **{**lease_fields(grant), "lease_token": BIGINT_PAST}
    )
    reply = await answer(processor, engine, settings, record)
    assert reply["type"] == "request.invalid" and "lease_token" in reply["error"], reply
    await assert_lease_untouched(engine, grant["lease_token"])


async def test_a_capture_whose_size_is_past_bigint_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted(processor, engine, settings)
    record = request(
        settings,
        "capture.submit",
        "one",
        **lease_fields(grant),
        capture_id="cap-1",
        url="https://board.example.com/1",
        storage_uri="s3://bucket/cap-1",
        sha256="0" * 64,
        content_type="text/html",
        size=BIGINT_PAST,
        captured_at="2026-01-01T00:00:00Z",
    )
    reply = await answer(processor, engine, settings, record)
    assert reply["type"] == "request.invalid" and "size" in reply["error"], reply
    assert await scalar(engine, "SELECT count(*) FROM captures") == 0
    await assert_lease_untouched(engine, grant["lease_token"])


async def test_an_upload_whose_local_storage_entry_is_named_by_a_list_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted(processor, engine, settings)
    state = {
        "cookies": [],
        "origins": [
            {"origin": "https://board.example.com", "localStorage": [{"name": ["a"], "value": "b"}]}
        ],
    }
    sealed = sealed_state(state, "session.upload", "one", grant["upload_key"])
    record = request(settings, "session.upload", "one", **lease_fields(grant), storage_state=sealed)
    reply = await answer(processor, engine, settings, record)
    assert reply["type"] == "request.invalid" and "storage_state" in reply["error"], reply
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0
    await assert_lease_untouched(engine, grant["lease_token"])


@pytest.mark.parametrize("seed_id", ["\u00b2", "9" * 40, "9223372036854775808", "\uff11"])
async def test_a_finish_with_a_seed_id_no_bigint_holds_is_refused_and_the_lease_kept(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, seed_id: str
) -> None:
    grant = await granted(processor, engine, settings)
    record = request(
        settings,
        "job.finish",
        "one",
        **lease_fields(grant),
        outcome="succeeded",
        seed_results=[{"seed_id": seed_id, "ok": True}],
    )
    reply = await answer(processor, engine, settings, record)
    assert reply["type"] == "request.invalid" and "seed_id" in reply["error"], reply
    await assert_lease_untouched(engine, grant["lease_token"])
    # the holder can still finish with what it meant to say
    fixed = request(settings, "job.finish", "one", **lease_fields(grant), outcome="succeeded")
    assert (await answer(processor, engine, settings, fixed))["type"] == "job.finished"


# the all-zero key; u = 1; an order-8 point; u = p - 1 (order 2); u = p and u = p + 1
# (non-canonical encodings of 0 and 1); and the all-zero key with the ignored top bit set
LOW_ORDER = [
    0,
    1,
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    P - 1,
    P,
    P + 1,
    2**255,
]


@pytest.mark.parametrize("u", LOW_ORDER, ids=lambda u: f"u{u % 1000}")
async def test_a_start_with_a_public_key_x25519_refuses_is_refused_as_invalid(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, u: int
) -> None:
    await make_site(engine, settings)
    reply = await answer(
        processor, engine, settings, start(settings, "bad", public_key=key_text(u))
    )
    assert reply["type"] == "request.invalid" and "public_key" in reply["error"], reply
    assert await scalar(engine, "SELECT count(*) FROM jobs") == 0
    assert await scalar(engine, "SELECT running FROM sites") == 0
    # the site is as it was: the next start is granted
    reply = await answer(processor, engine, settings, start(settings, "good"))
    assert reply["type"] == "job.granted"
