"""`qm audit leases` on the real history: collectors lease through the real worker and relay,
and the audit reads what the relay published on the test's qm.events."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli import app
from app.kafka import sdk_client
from app.settings import Settings
from app.store import seeds
from tests.support.cli import operator_cli
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

COLLECTORS = 16


async def test_audit_of_real_leasing_through_the_worker_and_relay_finds_no_violation(
    topics: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=3, n_accounts=4, lease_seconds=60)
    async with engine.begin() as conn:
        for n in range(6):
            await seeds.add_seed(conn, site="board", url=f"https://board.example.com/{n}",
                                 interval_seconds=1, priority=0)  # fmt: skip
    rng = random.Random(11)

    async def collector(n: int) -> None:
        async with (
            sdk_client(settings, collector=f"collector-{n}") as client,
            client.job(site="board", wait_seconds=120, timeout=30, seeds=1) as job,
        ):
            await job.heartbeat(extend_seconds=90)
            await asyncio.sleep(rng.uniform(0.01, 0.05))  # the crawl

    with QmProcess(settings, "worker"), QmProcess(settings, "relay"):
        await asyncio.wait_for(asyncio.gather(*(collector(n) for n in range(COLLECTORS))), 240)

        async def published() -> bool:
            return await scalar(engine, "SELECT count(*) FROM outbox") == 0

        await eventually(published, timeout=60)
    with operator_cli(settings, monkeypatch) as cli:
        result = await asyncio.to_thread(cli.invoke, app, ["audit", "leases", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert report["violations"] == [] and summary["unreadable"] == 0
    assert summary["facts"]["job.granted"] == COLLECTORS
    assert summary["facts"]["job.extended"] == COLLECTORS
    ends = summary["facts"].get("job.finished", 0)
    assert ends == COLLECTORS and summary["live_at_end"] == 0
    assert summary["facts"]["seed.assigned"] >= 1
