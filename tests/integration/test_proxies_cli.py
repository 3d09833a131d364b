"""`qm proxies …`, `qm sites --proxy/--retire-after-blocks` and the health in `qm accounts list`
as an operator uses them, against the real database: URLs sealed at rest and never shown."""

from __future__ import annotations

import json
from typing import Any

from click.testing import Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import make_site, scalar, start
from tests.support.proxies import PROXY_PASSWORD, events, proxy_url
from workers.requests import RequestProcessor

COMMANDS = ("add", "list", "remove", "block", "unblock")


async def execute(engine: AsyncEngine, sql: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql))


def _lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_proxies_commands_have_help(qm: Qm) -> None:
    for command in COMMANDS:
        result = await qm("proxies", command, "--help")
        assert result.exit_code == 0 and "SITE" in result.stdout, result.output


async def test_proxies_add_seals_the_url_and_list_remove_block_unblock_show_only_its_label(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=2)
    added = await qm("proxies", "add", "board", proxy_url(1), "--max-accounts", "2")
    assert added.exit_code == 0 and "http://10.0.0.1:3128 added to board" in added.stdout
    piped = await qm("proxies", "add", "board", "-", "--block-after", "5", input=proxy_url(2))
    assert piped.exit_code == 0, piped.output
    assert_one_red_line(await qm("proxies", "add", "board", proxy_url(1)), "already has")
    assert_one_red_line(await qm("proxies", "add", "board", "ftp://x:1"), "scheme")
    assert_one_red_line(await qm("proxies", "add", "nowhere", proxy_url(3)), "no site")
    # the URL is sealed at rest: its password is in no column
    stored = await scalar(engine, "SELECT string_agg(row_to_json(p)::text, '') FROM proxies p")
    assert PROXY_PASSWORD not in stored and "user1" not in stored

    listed = _lines(await qm("proxies", "list", "board", "--json"))
    assert [(p["label"], p["max_accounts"], p["block_after"], p["status"]) for p in listed] == [
        ("http://10.0.0.1:3128", 2, 3, "ACTIVE"),
        ("http://10.0.0.2:3128", 1, 5, "ACTIVE"),
    ]
    await execute(engine, "UPDATE accounts SET proxy_id = 1")
    blocked = await qm("proxies", "block", "board", proxy_url(1), "--reason", "banned range")
    assert blocked.exit_code == 0, blocked.output
    # one account moved to the other proxy (room for one), the other unpinned
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id = 2") == 1
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id IS NULL") == 1
    assert len(await events(engine, settings, "account.repinned")) == 2
    assert_one_red_line(await qm("proxies", "block", "board", proxy_url(1)), "blocked")
    table = await qm("proxies", "list")
    assert "banned range" in table.stdout and "BLOCKED" in table.stdout
    assert (await qm("proxies", "unblock", "board", "http://10.0.0.1:3128")).exit_code == 0
    assert await scalar(engine, "SELECT status::text FROM proxies WHERE id = 1") == "ACTIVE"
    removed = await qm("proxies", "remove", "board", proxy_url(2))
    assert removed.exit_code == 0 and "1 account(s) unpinned" in removed.stdout
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id IS NULL") == 2
    for result in (added, piped, listed and table, blocked, removed):
        assert PROXY_PASSWORD not in result.output


async def test_proxy_rule_and_retire_after_blocks_are_site_settings_and_health_is_listed(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    added = await qm("sites", "add", "shop", "--host", "shop.example.com", "--proxy", "required",
                     "--retire-after-blocks", "3")  # fmt: skip
    assert added.exit_code == 0, added.output
    row = "SELECT proxy_required::text || ' ' || retire_after_blocks FROM sites"
    assert await scalar(engine, row) == "true 3"
    changed = await qm("sites", "set", "shop", "--proxy", "optional", "--retire-after-blocks", "0")
    assert changed.exit_code == 0, changed.output
    assert await scalar(engine, "SELECT proxy_required FROM sites") is False
    assert await scalar(engine, "SELECT retire_after_blocks FROM sites") is None
    assert (await qm("sites", "set", "shop", "--proxy", "sometimes")).exit_code == 2

    await make_site(engine, settings, n_accounts=1)
    await execute(engine, "UPDATE accounts SET consecutive_blocks = 1")
    [account] = _lines(await qm("accounts", "list", "board", "--json"))
    assert (account["health"], account["consecutive_blocks"]) == ("at_risk", 1)
    table = await qm("accounts", "list")
    assert "at_risk" in table.stdout and "1 blocks, 0 errors" in table.stdout


async def test_proxy_jobs_show_says_a_waiting_job_waits_for_a_usable_proxy(
    qm: Qm, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await execute(engine, "UPDATE sites SET proxy_required = true")
    await RequestProcessor(settings, Database(engine)).process(start(settings, "job-1"))
    shown = json.loads((await qm("jobs", "show", "job-1", "--json")).stdout)
    assert shown["status"] == "QUEUED"
    assert [r for r in shown["waits_because"] if "usable proxy" in r and "qm proxies list" in r]
