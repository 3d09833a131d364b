"""Proxies end to end: collectors through the SDK, the real `qm` processes, real Kafka and
PostgreSQL. Each collector gets its account's proxy as Playwright takes it; a failing proxy
reported by one collector is blocked and its accounts move for every collector after."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.settings import Settings
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.proxies import PROXY_PASSWORD, grant_history, make_proxies, set_site

COLLECTORS = 24


async def test_proxy_collectors_get_their_accounts_own_proxy_and_a_reported_failure_moves_them(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=4, n_accounts=6, lease_seconds=60)
    await set_site(engine, "board", proxy_required=True)
    proxy_ids = await make_proxies(engine, settings, n=4, max_accounts=2, block_after=1)
    seen: dict[str, set[str]] = defaultdict(set)  # account -> the proxies it went out through

    async def collector(n: int, fail_proxy: bool = False) -> tuple[str, str]:
        async with (
            sdk_client(settings, collector=f"collector-{n}") as client,
            client.job(site="board", wait_seconds=120, timeout=30) as job,
        ):
            assert job.account is not None and job.proxy is not None
            server = job.proxy["server"]
            assert job.proxy["password"] == PROXY_PASSWORD
            assert job.proxy["username"] == f"user{server.split('.')[-1].split(':')[0]}"
            seen[job.account.id].add(server)
            if fail_proxy:
                job.proxy_failed()
            await asyncio.sleep(0.02)  # the crawl
            return job.account.id, server

    with QmProcess(settings, "all") as server:
        await asyncio.wait_for(asyncio.gather(*(collector(n) for n in range(COLLECTORS))), 240)
        # every account kept the one proxy it was pinned to, and no proxy carries more than K
        assert all(len(servers) == 1 for servers in seen.values()) and len(seen) == 6
        accounts_of: dict[str, set[str]] = defaultdict(set)
        for account, servers in seen.items():
            accounts_of[next(iter(servers))].add(account)
        assert all(len(accounts) <= 2 for accounts in accounts_of.values())
        # one collector reports its proxy failed: blocked (block_after 1), its accounts move
        account, failed = await asyncio.wait_for(collector(COLLECTORS, fail_proxy=True), 60)
        moved = accounts_of[failed]
        seen.clear()
        await asyncio.wait_for(
            asyncio.gather(*(collector(n) for n in range(COLLECTORS + 1, 2 * COLLECTORS))), 240
        )
        assert server.proc is not None and server.proc.poll() is None
        assert PROXY_PASSWORD not in server.output()
    blocked = await scalar(engine, "SELECT id FROM proxies WHERE status = 'BLOCKED'")
    assert blocked in proxy_ids
    assert all(failed not in servers for servers in seen.values())
    assert all(len(servers) == 1 for servers in seen.values())
    assert moved and all(a in seen for a in moved)  # the moved accounts went out again
    history = await grant_history(engine)
    last_failed = max(g["lease_token"] for g in history if g["proxy_id"] == blocked)
    after = [g for g in history if g["lease_token"] > last_failed]
    assert len(after) == COLLECTORS - 1 and all(g["proxy_id"] != blocked for g in after)
    loads = await scalar(
        engine,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM accounts WHERE proxy_id IS NOT NULL"
        " GROUP BY proxy_id) c",
    )
    assert loads <= 2 and account in {str(g["account_id"]) for g in history}
