"""A collector killed while holding a lease: the reaper reclaims it within lease + one sweep."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.settings import Settings
from tests.support.audit import audited
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess, settings_env
from tests.support.waiting import eventually

pytestmark = pytest.mark.chaos

LEASE = 3


async def test_a_lease_held_by_a_killed_collector_is_reclaimed_within_its_bound(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings, lease_seconds=LEASE)
    with QmProcess(settings, "all"):
        collector = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.collector", "board", "doomed", str(LEASE),
            env=settings_env(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert collector.stdout is not None
            await asyncio.wait_for(until_granted(collector.stdout), 90)
            collector.kill()  # SIGKILL while holding the lease
            killed_at = time.monotonic()
        finally:
            if collector.returncode is None:
                collector.kill()
            await collector.wait()
        async with (
            sdk_client(settings) as client,
            client.job(site="board", wait_seconds=60, timeout=30) as job,
        ):
            waited = time.monotonic() - killed_at
            assert job.account is not None
        await eventually(
            lambda: scalar(engine, "SELECT status::text = 'EXPIRED' FROM jobs WHERE id = 'doomed'"),
            timeout=10,
        )
        history = await audited(settings, engine)  # the relay is still running
    assert history.violations == [] and history.summary.unreadable == 0
    assert history.summary.facts["job.expired"] == 1 and history.summary.facts["job.granted"] == 2
    # stated bound: lease + sweep interval, plus the pipeline (request, relay, reply) margin
    assert waited <= LEASE + settings.reaper_interval_seconds + 3.0, waited
    assert (
        await scalar(engine, "SELECT end_reason FROM job_grants WHERE job_id = 'doomed'")
        == "expired"
    )


async def until_granted(stdout: asyncio.StreamReader) -> None:
    """Read the collector's output until it says it holds the lease."""
    while not (line := await stdout.readline()).startswith(b"granted"):
        assert line, "the collector exited before it was granted"
