"""1,000 captures from 10 collectors while the handoff worker and the reaper are SIGKILLed and
restarted at random: every capture ends HANDED_OFF, and appears exactly once on
``qm.captures.ready``."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.settings import Settings
from tests.integration.conftest_outbox import read_topic, running_relays
from tests.support.captures import capture_body
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

COLLECTORS = 10
PER_COLLECTOR = 100
KILLS = 5  # bounded: each kill costs the consumer group a session timeout to notice
RNG = random.Random(12)


async def collect(settings: Settings, n: int) -> list[str]:
    """One collector: a job, then its captures handed over one after another."""
    ids = []
    async with (
        sdk_client(settings, collector=f"collector-{n}") as client,
        client.job(site="board", lease_seconds=300, wait_seconds=60, timeout=60) as job,
    ):
        for k in range(PER_COLLECTOR):
            body = capture_body(f"c{n:02d}-{k:03d}")
            body.pop("captured_at")
            ids.append(await job.submit_capture(**body))
    return ids


async def chaos(processes: dict[str, QmProcess], submitted: asyncio.Future[list[list[str]]]) -> int:
    """Kill a random one of the processes and start it again, ``KILLS`` times; returns kills."""
    kills = 0
    while kills < KILLS:
        await asyncio.sleep(RNG.uniform(0.5, 2.5))  # pacing of the chaos, not a wait for a state
        victim = processes[RNG.choice(sorted(processes))]
        victim.kill()
        victim.start()
        kills += 1
    await submitted
    return kills


async def test_a_thousand_captures_are_handed_off_exactly_once_through_kills_and_restarts(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics.model_copy(
        update={"handoff_lease_seconds": 2.0, "handoff_redispatch_seconds": 5.0}
    )
    await make_site(engine, settings, capacity=COLLECTORS, n_accounts=COLLECTORS)
    total = COLLECTORS * PER_COLLECTOR
    with (
        QmProcess(settings, "worker"),
        QmProcess(settings, "handoff") as handoff,
        QmProcess(settings, "reaper") as reaper,
    ):
        async with running_relays(settings, 1):
            submitted: asyncio.Future[list[list[str]]] = asyncio.gather(
                *(collect(settings, n) for n in range(COLLECTORS))
            )
            kills = await chaos({"handoff": handoff, "reaper": reaper}, submitted)
            ids = [capture_id for batch in submitted.result() for capture_id in batch]
            assert len(set(ids)) == total and kills == KILLS

            async def all_handed_off() -> bool:
                done = await scalar(
                    engine, "SELECT count(*) FROM captures WHERE status = 'HANDED_OFF'"
                )
                return bool(done == total)

            await eventually(all_handed_off, timeout=90, every=0.5)
            await eventually(lambda: scalar(engine, "SELECT count(*) = 0 FROM outbox"), timeout=30)
    records = await read_topic(settings, settings.topic("captures.ready"), timeout=60)
    seen = Counter(json.loads(r.value)["capture_id"] for r in records)
    assert set(seen) == set(ids)
    assert [capture_id for capture_id, n in seen.items() if n != 1] == []
