"""Handoff workers killed at the worst moments (real processes, SIGKILL): the capture reaper brings
the capture back within its handoff lease + one sweep, and it is handed off once."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from tests.integration.conftest_outbox import read_topic, running_relays
from tests.support.captures import capture_row, running_job, running_reaper, submit, webhook
from tests.support.processes import QmProcess
from tests.support.waiting import eventually
from workers.requests import RequestProcessor

pytestmark = pytest.mark.chaos

LEASE_SECONDS = 3.0
# what a loaded 2-core machine may add to the bound (a sweep in flight, scheduling)
ALLOWANCE_SECONDS = 2.0


async def ready_records(settings: Settings) -> list[str]:
    records = await read_topic(settings, settings.topic("captures.ready"))
    return [json.loads(r.value)["capture_id"] for r in records]


async def reclaimed_at(settings: Settings, capture_id: str) -> datetime:
    """When the reaper gave the capture back (its ``capture.reclaimed`` event)."""
    for record in await read_topic(settings, settings.topic("events")):
        event = json.loads(record.value)
        if event["type"] == "capture.reclaimed" and event["id"] == capture_id:
            return datetime.fromisoformat(event["at"])
    raise AssertionError(f"{capture_id} was never reclaimed")


async def handed_off(engine: AsyncEngine, capture_id: str) -> bool:
    return (await capture_row(engine, capture_id))["status"] == "HANDED_OFF"


@pytest.mark.parametrize("fault", ["handoff_after_claim", "handoff_after_effect"])
async def test_a_handoff_worker_killed_before_finalising_is_reaped_and_hands_off_once(
    topics: Settings, engine: AsyncEngine, fault: str
) -> None:
    settings = topics.model_copy(update={"handoff_lease_seconds": LEASE_SECONDS})
    processor = RequestProcessor(settings, Database(engine))
    with webhook(200) as hook:
        lease = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", lease, "cap-1"))
        async with running_relays(settings, 1):
            with QmProcess(settings, "handoff", fault_point=fault, fault_job_id="job-1") as doomed:
                assert await asyncio.to_thread(doomed.wait, 60) == -9, doomed.output()[-3000:]
            claim = await capture_row(engine, "cap-1")
            assert claim["status"] == "HANDING_OFF"
            assert len(hook.hits) == (1 if fault == "handoff_after_effect" else 0)
            async with running_reaper(settings):
                with QmProcess(settings, "handoff") as survivor:
                    await eventually(lambda: handed_off(engine, "cap-1"), timeout=60)
                    assert survivor.proc is not None and survivor.proc.poll() is None
            back_at = await reclaimed_at(settings, "cap-1")
        bound = settings.reaper_interval_seconds + ALLOWANCE_SECONDS
        assert (back_at - claim["handoff_expires_at"]).total_seconds() <= bound
        # the effect may repeat, under the same key; capture.ready appears once
        keys = [hit.idempotency_key for hit in hook.hits]
        assert keys == ["cap-1"] * (2 if fault == "handoff_after_effect" else 1)
        assert await ready_records(settings) == ["cap-1"]


async def test_a_handoff_worker_killed_while_a_slow_webhook_answers_delays_its_capture_seconds(
    topics: Settings, engine: AsyncEngine
) -> None:
    """The claim is short and renewed while the target answers: a worker killed mid-answer holds
    its capture for one short lease, a sweep, and the group's move of its partitions — not for
    as long as a target may take."""
    settings = topics.model_copy(
        update={"handoff_lease_seconds": 3.0, "webhook_timeout_seconds": 30.0}
    )
    processor = RequestProcessor(settings, Database(engine))
    with webhook(0, 200) as hook:  # the first call never answers; the next one does
        lease = await running_job(processor, engine, settings, webhook_url=hook.url)
        await processor.process(submit(settings, "job-1", lease, "cap-1"))
        async with running_relays(settings, 1), running_reaper(settings):
            with QmProcess(settings, "handoff") as doomed:

                async def answering() -> bool:
                    return len(hook.hits) == 1

                await eventually(answering, timeout=60)
                # renewed past its first lease while the target is still answering
                first = (await capture_row(engine, "cap-1"))["handoff_expires_at"]

                async def renewed() -> bool:
                    return (await capture_row(engine, "cap-1"))["handoff_expires_at"] > first

                await eventually(renewed, timeout=10)
                with QmProcess(settings, "handoff") as survivor:
                    doomed.kill()
                    killed = time.monotonic()
                    await eventually(lambda: handed_off(engine, "cap-1"), timeout=60)
                    delay = time.monotonic() - killed
                    assert survivor.proc is not None and survivor.proc.poll() is None
    # the lease, a sweep, and the dead member's session in the group (its partitions move)
    bound = max(
        settings.handoff_lease_seconds + settings.reaper_interval_seconds,
        settings.consumer_session_timeout_ms / 1000,
    )
    assert delay <= bound + ALLOWANCE_SECONDS + 2, delay  # a rebalance's joins on a loaded machine
    assert [hit.idempotency_key for hit in hook.hits] == ["cap-1", "cap-1"]
    assert await ready_records(settings) == ["cap-1"]
