"""Seeds end to end: collectors through the SDK, the real `qm` processes, real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.sdk import QuartermasterClient
from app.settings import Settings
from tests.integration.test_seeds import add_seeds, assert_no_seed_held_twice
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess

COLLECTORS = 20
ROUNDS = 3


async def test_twenty_collectors_asking_for_five_seeds_each_round_never_share_one(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=COLLECTORS, n_accounts=0, lease_seconds=60)
    ids = await add_seeds(engine, 60, priority=lambda i: i % 2)
    handed: Counter[str] = Counter()

    async def collector(client: QuartermasterClient, n: int, round_: int) -> None:
        async with client.job(
            site="board", needs_account=False, seeds=5, wait_seconds=60, timeout=30
        ) as job:
            held = list(job.seeds)
            if len(held) < 5:
                held += await job.claim_seeds(5 - len(held))
            assert len(held) <= 5 and len({s.id for s in held}) == len(held)
            for seed in held:
                assert seed.url.startswith("https://board.example.com/board/")
                handed[seed.id] += 1
                job.seed_done(seed.id, ok=True, next_due_seconds=0)  # due again for next round

    with QmProcess(settings, "all"):
        async with sdk_client(settings) as client:
            for round_ in range(ROUNDS):
                await asyncio.wait_for(
                    asyncio.gather(*(collector(client, n, round_) for n in range(COLLECTORS))),
                    120,
                )
    # 100 asked a round of 60 seeds, each due again as soon as its holder finished: every seed
    # went out, and at least every seed once a round
    assert set(handed) == {str(i) for i in ids}
    assert ROUNDS * 60 <= sum(handed.values()) <= ROUNDS * COLLECTORS * 5
    assert await scalar(engine, "SELECT count(*) FROM seeds WHERE status = 'ACTIVE'") == 60
    holds = await scalar(engine, "SELECT count(*) FROM seed_assignments WHERE ended_at IS NOT NULL")
    assert holds == sum(handed.values())
    await assert_no_seed_held_twice(engine)
