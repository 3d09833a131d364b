"""An operator's revoke, end to end: the SDK holder learns it at once (no heartbeat needed), its
finish sends nothing, and its token acts on nothing any more."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.kafka import sdk_client
from app.settings import Settings
from tests.support.cli import operator_cli
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess
from tests.support.waiting import eventually


@pytest.fixture
def qm(topics: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    with operator_cli(topics, monkeypatch) as runner:
        yield runner


async def test_a_revoked_holder_hears_lease_lost_at_once_and_finishes_nothing(
    topics: Settings, engine: AsyncEngine, qm: CliRunner
) -> None:
    settings = topics
    await make_site(engine, settings, lease_seconds=300)
    with QmProcess(settings, "all"):
        async with (
            sdk_client(settings) as client,
            client.job(site="board", lease_seconds=300, timeout=30) as job,
        ):
            result = await asyncio.to_thread(
                qm.invoke, app, ["jobs", "revoke", job.job_id, "--reason", "misuse"]
            )
            assert result.exit_code == 0, result.output

            async def lost() -> bool:
                return job.lost

            await eventually(lost, timeout=20)  # heartbeats come every 100 s: not one of them
            assert job.lost_reason == "revoked"
        assert job.status is None  # no job.finish was sent for a lease that is gone
    assert await scalar(engine, "SELECT status::text FROM jobs") == "CANCELLED"
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"
