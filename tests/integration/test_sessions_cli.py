"""`qm sessions show|clear` against the real database: names and sizes, never values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from click.testing import Result
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.crypto import SecretBox
from app.settings import Settings, get_settings
from app.store import sessions, sites
from tests.support.leasing import make_site, scalar
from tests.support.waiting import eventually

Qm = Callable[..., Awaitable[Result]]
COOKIE_VALUE = "cookie-value-never-shown"
STORAGE_VALUE = "storage-value-never-shown"
STATE = {
    "cookies": [
        {"name": "auth", "value": COOKIE_VALUE, "domain": "127.0.0.1", "path": "/",
         "expires": 1_900_000_000, "httpOnly": True, "secure": False, "sameSite": "Lax"},
        {"name": "prefs", "value": "compact", "domain": ".board.example.com", "path": "/",
         "expires": -1, "httpOnly": False, "secure": True, "sameSite": "Lax"},
    ],
    "origins": [
        {"origin": "https://board.example.com",
         "localStorage": [{"name": "token", "value": STORAGE_VALUE}]},
    ],
}  # fmt: skip


@pytest.fixture
def qm(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Qm:
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("QM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    async def invoke(*args: str) -> Result:
        get_settings.cache_clear()
        return await asyncio.to_thread(runner.invoke, app, list(args))

    return invoke


async def with_session(engine: AsyncEngine, settings: Settings) -> None:
    [account] = await make_site(engine, settings)
    async with engine.begin() as conn:
        sealed = SecretBox.from_settings(settings).seal_json(STATE)
        await sessions.save_session(conn, account, sealed, None)


async def test_show_lists_cookie_names_domains_expiry_and_sizes_but_no_value(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await with_session(engine, settings)
    shown = await qm("sessions", "show", "board", "user0@board")
    assert shown.exit_code == 0, shown.output
    for expected in ("version 1", "auth", "127.0.0.1", "2030-03-17T17:46:40+00:00", "prefs",
                     "session", str(len(COOKIE_VALUE)), "https://board.example.com"):  # fmt: skip
        assert expected in shown.output
    assert COOKIE_VALUE not in shown.output and STORAGE_VALUE not in shown.output
    as_json = await qm("sessions", "show", "board", "user0@board", "--json")
    document = json.loads(as_json.output)
    assert [c["name"] for c in document["cookies"]] == ["auth", "prefs"]
    assert document["cookies"][0]["bytes"] == len(COOKIE_VALUE)
    assert document["origins"][0]["local_storage_entries"] == 1
    assert COOKIE_VALUE not in as_json.output and STORAGE_VALUE not in as_json.output


async def test_clear_deletes_the_session_and_says_so_on_the_events_topic(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await with_session(engine, settings)
    cleared = await qm("sessions", "clear", "board", "user0@board")
    assert cleared.exit_code == 0, cleared.output
    assert "cleared" in cleared.output and "was version 1" in cleared.output
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0
    event = await scalar(engine, "SELECT convert_from(payload, 'UTF8') FROM outbox")
    assert json.loads(event)["type"] == "session.cleared"
    again = await qm("sessions", "clear", "board", "user0@board")
    assert again.exit_code == 2 and "has no session" in again.output
    shown = await qm("sessions", "show", "board", "user0@board")
    assert shown.exit_code == 0 and "has no session" in shown.output


async def test_a_clear_racing_a_session_merge_is_not_undone_by_it(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await with_session(engine, settings)
    account = await scalar(engine, "SELECT id FROM accounts WHERE username = 'user0@board'")
    async with engine.connect() as merger:  # a claim worker's transaction merging an upload
        await merger.begin()
        await sites.lock_site(merger, "board")
        kept = await scalar(engine, "SELECT version FROM sessions")
        clearing = asyncio.create_task(qm("sessions", "clear", "board", "user0@board"))

        async def blocked_or_done() -> bool:
            waiting = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return clearing.done() or await scalar(engine, waiting) > 0

        await eventually(blocked_or_done)
        sealed = SecretBox.from_settings(settings).seal_json(STATE)
        assert await sessions.save_session(merger, account, sealed, kept) is not None
        await merger.commit()
    cleared = await clearing
    assert cleared.exit_code == 0, cleared.output
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0


async def test_an_unknown_account_is_one_line_and_exit_2(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    shown = await qm("sessions", "show", "board", "nobody")
    assert shown.exit_code == 2
    assert shown.output.strip() == "site 'board' has no account 'nobody'"


async def test_a_site_is_added_with_its_session_check_url(qm: Qm, engine: AsyncEngine) -> None:
    url = "http://127.0.0.1:8000/api/me"
    added = await qm("sites", "add", "web", "--host", "127.0.0.1", "--session-check-url", url)
    assert added.exit_code == 0, added.output
    assert await scalar(engine, "SELECT session_check_url FROM sites") == url
