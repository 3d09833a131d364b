"""`qm sites add|set` with use budgets (docs/policy.md), against the real database."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from tests.integration.test_operator_cli import Qm, json_lines, one_red_line
from tests.integration.test_operator_cli import qm as qm  # the fixture
from tests.support.leasing import make_site, start
from tests.support.policy import finish, set_budgets
from workers.requests import RequestProcessor

BUDGETS = ("account_budget", "account_budget_seconds", "grants_per_minute")


async def test_sites_add_and_set_take_budgets_and_zero_turns_one_off(qm: Qm) -> None:
    added = await qm(
        "sites", "add", "board", "--host", "board.example.com", "--account-budget", "100",
        "--budget-seconds", "600", "--grants-per-minute", "30",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert [site[key] for key in BUDGETS] == [100, 600, 30]
    listed = await qm("sites", "list")
    assert "budget 100 a 600s per account, 30 grants a minute" in " ".join(listed.stdout.split())

    changed = await qm("sites", "set", "board", "--grants-per-minute", "0", "--account-budget", "5")
    assert changed.exit_code == 0, changed.output

    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert [site[key] for key in BUDGETS] == [5, 600, None]


async def test_a_bad_budget_is_one_line_naming_the_option(qm: Qm) -> None:
    for option, value in (("--account-budget", "-1"), ("--budget-seconds", "0")):
        one_red_line(
            await qm("sites", "add", "board", "--host", "board.example.com", option, value), option
        )
    assert json_lines(await qm("sites", "list", "--json")) == []


async def test_jobs_show_says_a_waiting_job_waits_for_a_budget(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, capacity=5, n_accounts=1)
    await set_budgets(engine, account_budget=1)
    await processor.process(start(settings, "first"))
    await finish(processor, settings, engine, "first")
    await processor.process(start(settings, "second"))

    (shown,) = json_lines(await qm("jobs", "show", "second", "--json"))

    assert any("use budgets hold the line" in why for why in shown["waits_because"])
