"""The console's actions in real Chromium, each behind its confirmation and recorded as an event
naming the operator: they change state as the CLI does (block, revoke, replay, retry, pause)."""

from __future__ import annotations

import getpass
import json
from typing import Any

from playwright.async_api import Browser, Page
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import InvalidMessage
from app.kafka import sdk_client
from app.settings import Settings
from tests.support.captures import outbox_payloads, running_job, submit
from tests.support.cli import Qm, qm_fixture  # noqa: F401 - the `qm` fixture
from tests.support.console import (
    OPERATOR,
    Console,
    browser_fixture,  # noqa: F401 - the `browser` fixture
    console_fixture,  # noqa: F401 - the `console` fixture
    sign_in,
)
from tests.support.dead_letters import Letter, ledger, read_topic, write_dead_letters
from tests.support.leasing import make_site, scalar, start
from tests.support.processes import QmProcess
from tests.support.waiting import eventually
from workers.requests import RequestProcessor


async def events(engine: AsyncEngine, settings: Settings, type_: str) -> list[dict[str, Any]]:
    """The events of ``type_`` written to the outbox."""
    return [
        e for e in await outbox_payloads(engine, settings.topic("events")) if e["type"] == type_
    ]


async def confirm(page: Page, reason: str | None = None) -> str:
    """Confirm the action the page asks about; what the console answers."""
    form = page.locator("form#confirm")
    if reason is not None:
        await form.locator("input[name=reason]").fill(reason)
    await form.locator("button[type=submit]").click()
    outcome = page.locator("#outcome")
    await outcome.wait_for()
    return await outcome.inner_text()


async def test_an_account_blocked_on_the_page_is_blocked_in_qm_accounts_list(
    console: Console, browser: Browser, engine: AsyncEngine, qm: Qm
) -> None:
    settings = console.settings
    await make_site(engine, settings, n_accounts=2)
    page = await sign_in(browser, console)
    await page.goto(console.url + "/accounts?site=board")
    row = page.locator("#accounts tr[data-account='user0@board']")
    await row.locator("button", has_text="block").first.click()
    assert "Block user0@board of board" in await page.locator("h1").inner_text()
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE status = 'BLOCKED'") == 0

    assert "is now BLOCKED" in await confirm(page, reason="captcha wall")
    result = await qm("accounts", "list", "board", "--json")
    assert result.exit_code == 0, result.output
    listed = {row["username"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert listed["user0@board"]["status"] == "BLOCKED"
    assert listed["user0@board"]["blocked_reason"] == "captcha wall"
    assert listed["user1@board"]["status"] == "ACTIVE"
    [event] = await events(engine, settings, "account.blocked")
    assert event["operator"] == OPERATOR and event["reason"] == "captcha wall"

    await page.goto(console.url + "/accounts?site=board&status=BLOCKED")
    await page.locator("#accounts button", has_text="unblock").click()
    assert "is now ACTIVE" in await confirm(page)
    [event] = await events(engine, settings, "account.unblocked")
    assert event["operator"] == OPERATOR


async def test_a_job_revoked_on_its_page_tells_its_holder_job_lease_lost(
    console: Console, browser: Browser, engine: AsyncEngine, topics: Settings
) -> None:
    await make_site(engine, topics, lease_seconds=300)
    page = await sign_in(browser, console)
    with QmProcess(topics, "all"):
        async with (
            sdk_client(topics) as client,
            client.job(site="board", lease_seconds=300, timeout=30) as job,
        ):
            await page.goto(f"{console.url}/jobs/{job.job_id}")
            await page.locator("#revoke input[name=reason]").fill("misuse")
            await page.locator("#revoke button").click()
            assert not job.lost  # the confirmation comes first
            assert "its holder is told" in await confirm(page)

            async def lost() -> bool:
                return job.lost

            await eventually(lost, timeout=20)
            assert job.lost_reason == "revoked"
    assert await scalar(engine, "SELECT status::text FROM jobs") == "CANCELLED"
    await page.goto(f"{console.url}/jobs/{job.job_id}")
    assert await page.locator("#job-status").inner_text() == "CANCELLED"
    assert "revoked: misuse" in await page.locator("#job-facts").inner_text()


async def test_a_dead_letter_is_replayed_after_its_preview_and_only_once(
    console: Console, browser: Browser, engine: AsyncEngine
) -> None:
    settings = console.settings
    dlt = settings.topic("requests.dlt")
    value = json.dumps({"type": "job.start", "v": 1, "job_id": "job-9"}).encode()
    [written] = await write_dead_letters(
        settings, dlt, [Letter(b"job-9", value, InvalidMessage("schema violation"))]
    )
    page = await sign_in(browser, console)
    await page.goto(console.url + "/dead-letters")
    topic_row = page.locator(f"#dlt-topics tr[data-topic='{dlt}']")
    assert "InvalidMessage: 1" in await topic_row.inner_text()
    await topic_row.locator("a").first.click()
    letter = page.locator(f"article[data-offset='0:{written.offset}']")
    original = await letter.locator(".original").inner_text()
    assert original == f"{settings.topic('requests')}:0:1000"

    await page.locator("#replay button").click()
    assert "selected 1: 1 would be sent" in await page.locator("#preview-summary").inner_text()
    assert await ledger(engine) == []  # the preview sent nothing
    assert "replayed 1" in await confirm(page)
    assert await ledger(engine) == [(dlt, 0, written.offset, settings.topic("requests"))]
    sent = [v for _, v, _ in await read_topic(settings, settings.topic("requests"))]
    assert sent == [value]
    [event] = await events(engine, settings, "dead_letter.replayed")
    assert event["operator"] == OPERATOR and event["id"] == dlt

    await page.goto(f"{console.url}/dead-letters/{dlt}")
    await page.locator("#replay button").click()
    assert await page.locator("form#confirm").count() == 0  # nothing left to replay
    assert "1 were replayed already" in await page.locator("#preview-summary").inner_text()


async def test_a_failed_capture_is_retried_from_its_page(
    console: Console, browser: Browser, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    settings = console.settings
    lease = await running_job(processor, engine, settings)
    assert await processor.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "UPDATE captures SET status = 'FAILED', failed_at = now(), attempts = 5,"
            " last_error = 'webhook answered 500'"
        )
    page = await sign_in(browser, console)
    await page.goto(console.url + "/captures?status=FAILED")
    assert "webhook answered 500" in await page.locator("#captures").inner_text()
    await page.locator("#captures a", has_text="cap-1").click()
    await page.locator("button", has_text="Retry handoff").click()
    assert "will be handed off again" in await confirm(page)
    assert await scalar(engine, "SELECT status::text FROM captures") == "RECEIVED"
    [event] = await events(engine, settings, "capture.retried")
    assert event["operator"] == OPERATOR


async def test_a_site_paused_and_resumed_on_its_page_keeps_its_capacity_as_the_cli_does(
    console: Console, browser: Browser, engine: AsyncEngine, qm: Qm, processor: RequestProcessor
) -> None:
    settings = console.settings
    await make_site(engine, settings, capacity=3)
    page = await sign_in(browser, console)
    await page.goto(console.url + "/sites/board")
    await page.locator("button", has_text="Pause site").click()
    assert "paused" in await confirm(page)

    async def listed() -> dict[str, Any]:
        result = await qm("sites", "list", "--json")
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout))

    assert (await listed())["capacity"] == 0 and (await listed())["paused_capacity"] == 3
    await page.goto(console.url + "/sites/board")
    assert "paused; 3 when resumed" in await page.locator("#site-figures").inner_text()
    assert await processor.process(start(settings, "job-1")) == "replied"
    await page.goto(console.url + "/jobs/job-1")
    assert "the site is paused by an operator" in await page.locator("#waits-because").inner_text()
    await page.goto(console.url + "/sites/board")
    await page.locator("button", has_text="Resume site").click()
    assert "resumed with capacity 3" in await confirm(page)
    assert (await listed())["capacity"] == 3 and (await listed())["paused_capacity"] is None

    # the CLI makes the same moves, and the page shows them
    assert (await qm("sites", "pause", "board")).exit_code == 0
    await page.goto(console.url + "/sites/board")
    assert await page.locator("button", has_text="Resume site").count() == 1
    assert (await qm("sites", "resume", "board")).exit_code == 0
    again = await qm("sites", "resume", "board")
    assert again.exit_code == 2 and "not paused" in again.stderr
    moves = [
        (e["type"], e["operator"])
        for e in await outbox_payloads(engine, settings.topic("events"))
        if e["entity"] == "site"
    ]
    assert moves[:2] == [("site.paused", OPERATOR), ("site.resumed", OPERATOR)]
    assert [move[0] for move in moves[2:]] == ["site.paused", "site.resumed"]
    assert moves[2][1] == getpass.getuser()  # the CLI names the operator's login


async def test_qm_accounts_block_is_the_console_s_move_with_the_same_event(
    console: Console, engine: AsyncEngine, qm: Qm
) -> None:
    await make_site(engine, console.settings)
    result = await qm("accounts", "block", "board", "user0@board", "--reason", "by hand")
    assert result.exit_code == 0, result.output
    [event] = await events(engine, console.settings, "account.blocked")
    assert (event["reason"], event["operator"]) == ("by hand", getpass.getuser())
