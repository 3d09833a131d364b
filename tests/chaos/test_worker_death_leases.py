"""A claim worker killed while collectors heartbeat through it: with leases at the safe minimum
(three consumer session timeouts, the default rule), every holder keeps its lease across the
stall that the move of the dead worker's partitions causes."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.settings import Settings
from tests.support.audit import audited
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

JOBS = 8


async def test_heartbeating_holders_keep_their_leases_when_a_claim_worker_dies(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics.model_copy(update={"min_lease_seconds": None})  # the default rule
    shortest = settings.shortest_lease()
    assert shortest == 3 * settings.consumer_session_timeout_ms // 1000
    await make_site(engine, settings, capacity=JOBS, n_accounts=JOBS, lease_seconds=1)
    workers = [QmProcess(settings, "worker", worker_consumers=3) for _ in range(2)]
    with QmProcess(settings, "relay"), QmProcess(settings, "reaper"):
        for worker in workers:
            worker.start()
        try:
            async with sdk_client(settings, request_timeout=60) as client:
                jobs = [client.job(site="board", lease_seconds=1, timeout=60) for _ in range(JOBS)]
                held = await asyncio.gather(*(job.__aenter__() for job in jobs))
                for job in held:  # asked for 1 s, granted the safe minimum
                    granted = job._granted()
                    assert (granted.lease_expires_at - granted.granted_at).seconds == shortest
                workers[0].kill()
                killed_at = await scalar(engine, "SELECT clock_timestamp()")
                # every lease was extended after the stall: the partitions moved, heartbeats
                # went on, and none was lost meanwhile
                stall = settings.consumer_session_timeout_ms / 1000 + 1
                await eventually(
                    lambda: _extended_after(engine, killed_at, stall + shortest),
                    timeout=3 * shortest,
                )
                assert not [job.job_id for job in held if job.lost]
                for job in held:
                    await job.__aexit__(None, None, None)
            assert [job.status for job in held] == ["SUCCEEDED"] * JOBS
            history = await audited(settings, engine)  # the relay is still running
            assert history.violations == [] and history.summary.unreadable == 0
            assert history.summary.facts["job.granted"] == JOBS
        finally:
            for worker in workers:
                worker.stop()
    assert await scalar(engine, "SELECT count(*) FROM jobs WHERE status = 'EXPIRED'") == 0


async def _extended_after(engine: AsyncEngine, since: datetime, span: float) -> bool:
    """Every running job's lease now ends more than ``span`` seconds after ``since``."""
    return bool(
        await scalar(
            engine,
            "SELECT count(*) = :jobs AND bool_and(lease_expires_at > CAST(:since AS timestamptz)"
            " + make_interval(secs => :span)) FROM jobs WHERE status = 'RUNNING'",
            jobs=JOBS,
            since=since,
            span=span,
        )
    )
