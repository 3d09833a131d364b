"""Account health against the real database: blocks and errors in a row, the health state shown
to operators, and a site's rule that retires an account after N blocks in a row (with many
collectors at once, a retired account is never granted again)."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.alerts.slack import Notifier
from app.alerts.watch import AlertWatch
from app.commands.top import health_cell
from app.health import set_site_gauges
from app.settings import Settings
from app.store import Database, accounts, sites, views
from schemas.states import AccountStatus
from tests.support.leasing import lease_fields, make_site, replies, request, scalar, start
from tests.support.proxies import events, grant_history, set_site
from tests.support.slack import FakeSlack
from workers.requests import RequestProcessor


@pytest.fixture(params=[1, 32], ids=["own-transactions", "shared-transactions"])
async def processor(
    request: pytest.FixtureRequest, settings: Settings, engine: AsyncEngine
) -> RequestProcessor:
    return RequestProcessor(
        settings.model_copy(update={"worker_batch_max": request.param}), Database(engine)
    )


async def run_job(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, job_id: str, outcome: str
) -> None:
    """Start a job, and finish it with ``outcome`` (a block names a short rest)."""
    await processor.process(start(settings, job_id))
    [grant] = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    rest = {"cooldown_seconds": 1} if outcome == "blocked" else {}
    finish = request(
        settings, "job.finish", job_id, **lease_fields(grant), outcome=outcome, reason="captcha",
        **rest,
    )  # fmt: skip
    await processor.process(finish)


async def unblock(engine: AsyncEngine, username: str = "user0@board") -> None:
    """An operator ends a block at once (as the block-cooldowns sweep would after the rest)."""
    async with engine.begin() as conn:
        moved = await accounts.set_account_status(
            conn, site="board", username=username, target=AccountStatus.ACTIVE
        )
        assert moved is not None


async def test_policy_retire_after_blocks_deactivates_an_account_with_an_event(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    (account,) = await make_site(engine, settings)
    await set_site(engine, "board", retire_after_blocks=2)
    await run_job(processor, engine, settings, "job-1", "blocked")
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"
    await unblock(engine)
    await run_job(processor, engine, settings, "job-2", "blocked")
    row = await scalar(engine, "SELECT status::text || ': ' || blocked_reason FROM accounts")
    assert row == "INACTIVE: retired after 2 blocks in a row: captcha"
    [retired] = await events(engine, settings, "account.retired")
    assert (retired["id"], retired["status"], retired["job_id"]) == (str(account), "INACTIVE",
                                                                     "job-2")  # fmt: skip
    assert retired["reason"] == "2 blocks in a row"
    assert len(await events(engine, settings, "account.blocked")) == 1  # the first one
    await processor.process(start(settings, "job-3"))
    [refused] = await replies(engine, settings, "job-3")
    assert (refused["type"], refused["reason"]) == ("job.rejected", "no_accounts")


async def test_policy_a_success_forgets_the_blocks_and_errors_in_a_row(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await set_site(engine, "board", retire_after_blocks=2)
    await run_job(processor, engine, settings, "job-1", "blocked")
    await unblock(engine)
    await run_job(processor, engine, settings, "job-2", "failed")
    counts = "SELECT consecutive_blocks || ' ' || consecutive_errors FROM accounts"
    assert await scalar(engine, counts) == "1 1"
    await run_job(processor, engine, settings, "job-3", "succeeded")
    assert await scalar(engine, counts) == "0 0"
    await run_job(processor, engine, settings, "job-4", "blocked")  # one in a row: not retired
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"


async def test_policy_many_collectors_at_once_never_get_a_retired_account(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    ids = await make_site(engine, settings, capacity=4, n_accounts=4)
    await set_site(engine, "board", retire_after_blocks=1)
    await asyncio.gather(*(processor.process(start(settings, f"first-{n}")) for n in range(4)))
    history = await grant_history(engine)
    blocked_jobs = {g["job_id"] for g in history[:2]}
    finishes = []
    for g in history:
        [grant] = [r for r in await replies(engine, settings, g["job_id"]) if "lease_secret" in r]
        outcome = "blocked" if g["job_id"] in blocked_jobs else "succeeded"
        fields = {"cooldown_seconds": 1} if outcome == "blocked" else {}
        finishes.append(request(settings, "job.finish", g["job_id"], **lease_fields(grant),
                                outcome=outcome, **fields))  # fmt: skip
    await asyncio.gather(*(processor.process(f) for f in finishes))
    retired = {g["account_id"] for g in history[:2]}
    statuses = await scalar(engine, "SELECT json_object_agg(id, status) FROM accounts")
    assert {int(i) for i, s in statuses.items() if s == "INACTIVE"} == retired
    # twenty collectors at once, then the line moves on as each finishes
    await asyncio.gather(*(processor.process(start(settings, f"next-{n}")) for n in range(20)))
    for _ in range(20):
        running = [g for g in await grant_history(engine) if g["ended_at"] is None]
        if not running:
            break
        for g in running:
            [grant] = [r for r in await replies(engine, settings, g["job_id"])
                       if r["type"] == "job.granted"]  # fmt: skip
            await processor.process(request(settings, "job.finish", g["job_id"],
                                            **lease_fields(grant), outcome="succeeded"))  # fmt: skip
    later = (await grant_history(engine))[4:]
    assert len(later) == 20
    assert {g["account_id"] for g in later} == set(ids) - retired


async def test_policy_health_states_are_shown_in_the_list_the_overview_and_the_metric(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=6)
    await set_site(engine, "board", retire_after_blocks=3)
    async with engine.begin() as conn:
        # user0: new; user1: used and old; user2: one block; user3: errors; user4: two blocks,
        # one away from retirement; user5: retired
        await conn.execute(text("UPDATE accounts SET use_count = 50, "
                                "created_at = now() - interval '30 days' WHERE id > 1"))  # fmt: skip
        await conn.execute(text("UPDATE accounts SET consecutive_blocks = 1 WHERE id = 3"))
        await conn.execute(text("UPDATE accounts SET consecutive_errors = 6 WHERE id = 4"))
        await conn.execute(text("UPDATE accounts SET consecutive_blocks = 2 WHERE id = 5"))
        await conn.execute(text("UPDATE accounts SET status = 'INACTIVE' WHERE id = 6"))
        listed = await accounts.list_accounts(conn, "board")
        load = await sites.site_load(conn)
        [overview] = await views.site_overview(conn)
    assert [row["health"] for row in listed] == [
        "new", "healthy", "at_risk", "failing", "failing", "retired",
    ]  # fmt: skip
    [site] = load
    assert site["health"] == {"new": 1, "healthy": 1, "at_risk": 1, "failing": 2, "blocked": 0,
                              "retired": 1}  # fmt: skip
    # qm top: the site's accounts by health, in the order of the states
    assert health_cell(overview["health"]).plain == (
        "1 new, 1 healthy, 1 at_risk, 2 failing, 1 retired"
    )
    set_site_gauges(load)
    value = REGISTRY.get_sample_value(
        "qm_site_account_health", {"site": "board", "health": "failing"}
    )
    assert value == 2


async def test_policy_retired_account_is_posted_to_slack_once_and_its_return_too(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    (account,) = await make_site(engine, settings)
    await set_site(engine, "board", retire_after_blocks=1)
    await run_job(processor, engine, settings, "job-1", "blocked")
    [retired] = await events(engine, settings, "account.retired")
    with FakeSlack() as slack:
        watch = AlertWatch(settings, Database(engine), Notifier(slack.url))
        for _ in range(2):  # seen twice (a redelivery): posted once
            await watch.on_event(json.dumps(retired).encode())
        await watch.run_once()
        await unblock(engine)  # an operator returns it
        await watch.run_once()
        texts = slack.texts()
    fired = [t for t in texts if f"Account {account} of site board is retired" in t]
    assert len(fired) == 1 and "after 1 blocks in a row" in fired[0] and "job-1" in fired[0]
    assert [t for t in texts if f"Account {account} is no longer retired (ACTIVE)" in t]
