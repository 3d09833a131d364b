"""Sessions: uploads merge into the held account's session, the next grant carries it, fencing holds."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from tests.support.leasing import (
    make_site,
    opened_session,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from workers.requests import RequestProcessor


@pytest.fixture
def processor(settings: Settings, engine: AsyncEngine) -> RequestProcessor:
    return RequestProcessor(settings, Database(engine))


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
    await make_site(engine, settings)
    await processor.process(start(settings, "one"))
    [grant] = await replies(engine, settings)
    token, upload_key = grant["lease_token"], grant["upload_key"]
    await processor.process(
        request(
            settings,
            "session.upload",
            "one",
            lease_token=token,
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
            lease_token=token,
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
    await make_site(engine, settings)
    await processor.process(start(settings, "one"))
    [grant] = await replies(engine, settings)
    sealed = sealed_state(state(a="1"), "session.upload", "one", grant["upload_key"])
    await processor.process(
        request(
            settings,
            "session.upload",
            "one",
            lease_token=grant["lease_token"] + 1,
            storage_state=sealed,
        )
    )
    assert (await replies(engine, settings))[-1]["type"] == "job.lease_lost"
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0
