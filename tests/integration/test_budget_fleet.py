"""Use budgets and scopes with a fleet: many collectors through the SDK at once, the real `qm`
processes (claim worker, relay, reapers), real Kafka and PostgreSQL. What the rules promise is
counted from the grants (``job_grants``), not from what the collectors saw."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.sdk import JobRejected
from app.settings import Settings
from tests.support.leasing import make_site, scalar
from tests.support.policy import set_budgets
from tests.support.processes import QmProcess

COLLECTORS = 24


async def grants(engine: AsyncEngine, where: str = "true") -> list[dict[str, object]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(f"SELECT account_id, scope, granted_at FROM job_grants WHERE {where}")
        )
        return [dict(row._mapping) for row in rows]


async def test_a_fleet_never_takes_an_account_past_its_budget(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=4, n_accounts=3, lease_seconds=60)
    await set_budgets(engine, account_budget=3, account_budget_seconds=3600)

    async def collector(n: int) -> str:
        try:
            async with (
                sdk_client(settings, collector=f"collector-{n}") as client,
                client.job(site="board", wait_seconds=8, timeout=30) as job,
            ):
                job.units(1)  # one page: the grant's own count
                await asyncio.sleep(0.05)
                return "granted"
        except JobRejected as rejected:
            return rejected.reason

    with QmProcess(settings, "all") as server:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(collector(n) for n in range(COLLECTORS))), 120
        )
        assert server.proc is not None and server.proc.poll() is None

    assert Counter(outcomes) == {"granted": 9, "timed_out": COLLECTORS - 9}
    per_account = Counter(g["account_id"] for g in await grants(engine))
    assert sorted(per_account.values()) == [3, 3, 3]


async def test_a_fleet_is_not_granted_a_rate_limited_scope_while_other_scopes_are(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=4, n_accounts=2, lease_seconds=60)

    async def collector(n: int, scope: str, limit: bool = False, wait: int = 30) -> str:
        try:
            async with (
                sdk_client(settings, collector=f"collector-{n}") as client,
                client.job(site="board", scope=scope, wait_seconds=wait, timeout=30) as job,
            ):
                if limit:
                    job.rate_limited(retry_after=3600, reason="429")
                await asyncio.sleep(0.05)
                return "granted"
        except JobRejected as rejected:
            return rejected.reason

    with QmProcess(settings, "all") as server:
        for n in range(2):  # both accounts rate-limited for search, one after the other
            assert await collector(n, "search", limit=True) == "granted"
        fleet = [collector(10 + n, "search", wait=0) for n in range(COLLECTORS // 2)]
        fleet += [collector(100 + n, "profile") for n in range(COLLECTORS // 2)]
        outcomes = await asyncio.wait_for(asyncio.gather(*fleet), 120)
        assert server.proc is not None and server.proc.poll() is None

    half = COLLECTORS // 2
    # a search start finds the accounts rate-limited, or in use by profile jobs (no_capacity)
    assert set(outcomes[:half]) <= {"rate_limited", "no_capacity"}
    assert "rate_limited" in outcomes[:half] and outcomes[half:] == ["granted"] * half
    assert await scalar(engine, "SELECT count(DISTINCT account_id) FROM account_scope_rests") == 2
    limited = await grants(engine, "scope = 'search'")
    assert len(limited) == 2  # the two that hit the limit, none after


async def test_a_fleet_gets_no_more_than_the_sites_grants_per_minute(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=50, n_accounts=COLLECTORS, lease_seconds=60)
    await set_budgets(engine, grants_per_minute=10)

    async def collector(n: int) -> str:
        try:
            async with (
                sdk_client(settings, collector=f"collector-{n}") as client,
                client.job(site="board", wait_seconds=5, timeout=30),
            ):
                return "granted"
        except JobRejected as rejected:
            return rejected.reason

    with QmProcess(settings, "all") as server:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(collector(n) for n in range(COLLECTORS))), 120
        )
        assert server.proc is not None and server.proc.poll() is None

    times = sorted(g["granted_at"] for g in await grants(engine))
    seconds = (times[-1] - times[0]).total_seconds()  # type: ignore[operator]
    # the bucket's minute's worth at once, then 10 a minute: within the window the grants span
    assert 10 <= len(times) <= 10 + int(10 * seconds / 60) + 1
    assert Counter(outcomes)["granted"] == len(times)


async def test_a_job_held_for_its_budget_is_granted_by_the_reaper_within_its_interval(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics  # the reaper sweeps every 0.2 s
    await make_site(engine, settings, capacity=2, n_accounts=1, lease_seconds=60)
    await set_budgets(engine, account_budget=1, account_budget_seconds=2)

    with QmProcess(settings, "all") as server:
        async with sdk_client(settings) as client:
            async with client.job(site="board", job_id="first", timeout=30):
                pass
            async with client.job(site="board", job_id="held", wait_seconds=30, timeout=30):
                pass
        assert server.proc is not None and server.proc.poll() is None

    first, held = sorted(g["granted_at"] for g in await grants(engine))
    waited = (held - first).total_seconds()  # type: ignore[operator]
    # the window slides past the first grant after 2 s; the sweep grants within its interval
    assert 2.0 <= waited <= 2.0 + settings.reaper_interval_seconds + 1.0
