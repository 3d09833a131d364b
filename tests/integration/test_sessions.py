"""Sessions: uploads merge into the held account's session, the next grant carries it, fencing holds."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database, sessions
from tests.support.leasing import (
    lease_fields,
    make_site,
    opened_session,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from workers.requests import RequestProcessor


async def granted_on_a_fresh_site(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> dict[str, Any]:
    """Job "one" started on a fresh site: its ``job.granted`` reply."""
    await make_site(engine, settings)
    await processor.process(start(settings, "one"))
    [grant] = await replies(engine, settings)
    return grant


def state(**cookies: str) -> dict:
    return {
        "cookies": [
            {"name": k, "value": v, "domain": "b.example.com", "path": "/"}
            for k, v in cookies.items()
        ]
    }


async def test_uploads_and_finish_merge_into_the_session_the_next_grant_carries(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted_on_a_fresh_site(processor, engine, settings)
    lease, upload_key = lease_fields(grant), grant["upload_key"]
    await processor.process(
        request(
            settings,
            "session.upload",
            "one",
            **lease,
            storage_state=sealed_state(
                state(sid="1", once="x"), "session.upload", "one", upload_key
            ),
        )
    )
    await processor.process(
        request(
            settings,
            "job.finish",
            "one",
            **lease,
            outcome="succeeded",
            session_state=sealed_state(state(sid="2"), "job.finish", "one", upload_key),
        )
    )
    await processor.process(start(settings, "two"))
    answers = await replies(engine, settings)
    assert [r["type"] for r in answers] == [
        "job.granted",
        "session.merged",
        "job.finished",
        "job.granted",
    ]
    session = answers[-1]["session"]
    assert session["version"] == 2
    assert {c["name"]: c["value"] for c in opened_session(answers[-1])["cookies"]} == {
        "sid": "2",
        "once": "x",
    }
    stored = await scalar(engine, "SELECT storage_state FROM sessions")
    assert b"once" not in bytes(stored)  # sealed at rest


async def test_an_upload_without_a_live_lease_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted_on_a_fresh_site(processor, engine, settings)
    sealed = sealed_state(state(a="1"), "session.upload", "one", grant["upload_key"])
    await processor.process(
        request(
            settings,
            "session.upload",
            "one",
            **{**lease_fields(grant), "lease_token": grant["lease_token"] + 1},
            storage_state=sealed,
        )
    )
    assert (await replies(engine, settings))[-1]["type"] == "job.lease_lost"
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0


async def test_an_upload_over_the_session_bounds_is_rejected_and_the_session_kept(
    engine: AsyncEngine, settings: Settings
) -> None:
    bounded = settings.model_copy(update={"session_max_cookies": 2})
    processor = RequestProcessor(bounded, Database(engine))
    grant = await granted_on_a_fresh_site(processor, engine, bounded)
    lease, key = lease_fields(grant), grant["upload_key"]
    upload = dict(settings=bounded, type_="session.upload", job_id="one", **lease)
    first = sealed_state(state(a="1", b="2"), "session.upload", "one", key)
    await processor.process(request(**upload, storage_state=first))
    second = sealed_state(state(c="secret-value"), "session.upload", "one", key)
    await processor.process(request(**upload, storage_state=second))
    answers = await replies(engine, bounded)
    assert [r["type"] for r in answers] == ["job.granted", "session.merged", "session.rejected"]
    assert answers[-1]["reason"] == "session_too_large"
    assert answers[-1]["detail"] == "the session would hold 3 cookies; at most 2 are kept"
    assert await scalar(engine, "SELECT version FROM sessions") == 1
    events = await scalar(
        engine, "SELECT string_agg(convert_from(payload, 'UTF8'), ' ') FROM outbox"
    )
    assert "session.rejected" in events and "secret-value" not in events


async def test_a_cookie_deleted_with_a_past_expiry_is_gone_from_the_next_grant(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    grant = await granted_on_a_fresh_site(processor, engine, settings)
    lease, key = lease_fields(grant), grant["upload_key"]
    login = sealed_state(state(sid="1"), "session.upload", "one", key)
    await processor.process(
        request(settings, "session.upload", "one", **lease, storage_state=login)
    )
    logout = state(sid="")
    logout["cookies"][0]["expires"] = 1  # 1970: in the past by the database's clock
    await processor.process(
        request(
            settings,
            "job.finish",
            "one",
            **lease,
            outcome="succeeded",
            session_state=sealed_state(logout, "job.finish", "one", key),
        )
    )
    await processor.process(start(settings, "two"))
    granted = (await replies(engine, settings))[-1]
    assert granted["type"] == "job.granted"
    assert opened_session(granted)["cookies"] == []


async def test_a_save_over_a_session_cleared_since_it_was_read_changes_nothing(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=1)
    account = await scalar(engine, "SELECT min(id) FROM accounts")
    async with engine.begin() as conn:
        assert await sessions.save_session(conn, account, b"first", None) == 1
        assert await sessions.save_session(conn, account, b"again", None) is None  # not first
        assert await sessions.save_session(conn, account, b"second", 1) == 2
    async with engine.begin() as conn:  # an operator clears it after a merge read version 2
        await sessions.clear_session(
            conn, "board", await scalar(engine, "SELECT min(username) FROM accounts")
        )
    async with engine.begin() as conn:
        assert await sessions.save_session(conn, account, b"stale", 2) is None
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0
