"""`qm dlt replay` of failed captures' dead letters: the capture is handed off again, and the
summary never counts as replayed a dead letter that changed nothing.

The capture fails through the real handoff worker (a target that refuses it for good), its dead
letter reaches ``qm.captures.dlt`` through the real relay, and the operator runs `qm dlt replay`.
"""

from __future__ import annotations

import asyncio

from click.testing import Result
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.handoff import Delivery, TargetError
from app.settings import Settings, get_settings
from app.store import Database
from tests.integration.conftest_outbox import running_relays
from tests.support.captures import capture_row, outbox_payloads, running_job, submit
from tests.support.dead_letters import Qm, qm_fixture, read_topic  # noqa: F401 - the fixture
from tests.support.waiting import eventually
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor


class Refuser:
    name = "refuser"

    async def deliver(self, delivery: Delivery) -> None:
        raise TargetError("refused for good", retryable=False)


async def failed_captures(engine: AsyncEngine, settings: Settings, *ids: str) -> None:
    """``ids`` handed in, each failed by its target; their dead letters on ``qm.captures.dlt``."""
    processor = RequestProcessor(settings, Database(engine))
    lease = await running_job(processor, engine, settings)
    refusing = HandoffWorker(settings, Database(engine), targets=lambda d: [Refuser()])
    for capture_id in ids:
        await processor.process(submit(settings, "job-1", lease, capture_id))
        assert await refusing.hand_off(capture_id) == "failed"
    dlt = settings.topic("captures.dlt")
    async with running_relays(settings, 1):

        async def arrived() -> bool:
            return len(await read_topic(settings, dlt)) == len(ids)

        await eventually(arrived, timeout=30)


def summary(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


async def handoff_records(engine: AsyncEngine, settings: Settings) -> list[str]:
    return [r["capture_id"] for r in await outbox_payloads(engine, settings.topic("captures"))]


async def test_replaying_a_failed_captures_dead_letter_hands_it_off_again(
    topics: Settings, engine: AsyncEngine, qm: Qm
) -> None:
    settings = topics
    await failed_captures(engine, settings, "cap-1")
    before = await handoff_records(engine, settings)
    target = settings.topic("captures")

    dry = summary(await qm("replay", "captures", "--key", "cap-1", "--dry-run"))
    assert dry[-1] == (
        "dry run: 1 selected, 1 would be replayed, 0 skipped as already replayed; nothing was sent"
    )
    assert (await capture_row(engine, "cap-1"))["status"] == "FAILED"

    # the downstream is mended; the documented remedy
    assert summary(await qm("replay", "captures", "--key", "cap-1")) == [
        f"1 selected, 1 replayed to {target} (1), 0 skipped as already replayed"
    ]
    row = await capture_row(engine, "cap-1")
    assert (row["status"], row["attempts"], row["failed_at"]) == ("RECEIVED", 0, None)
    assert await handoff_records(engine, settings) == [*before, "cap-1"]
    event = (await outbox_payloads(engine, settings.topic("events")))[-1]
    assert event["type"] == "capture.retried" and event["reason"].startswith(
        f"replayed from {settings.topic('captures.dlt')}:"
    )
    # the record it wrote is what the handoff worker reads: the capture is handed off
    assert await HandoffWorker(settings, Database(engine)).hand_off("cap-1") == "handed_off"

    # nothing more to do: a second run says so and changes nothing
    assert summary(await qm("replay", "captures", "--key", "cap-1"))[0] == (
        "1 selected, 0 replayed, 1 skipped as already replayed"
    )
    again = summary(await qm("replay", "captures", "--key", "cap-1", "--again"))
    assert again[0] == (
        "1 selected, 0 replayed, 0 skipped as already replayed, "
        "1 not replayed (their capture is not FAILED)"
    )
    assert again[1].startswith(settings.topic("captures.dlt") + ":")
    assert again[1].endswith(": capture cap-1 is HANDED_OFF, not FAILED; nothing to hand off again")
    assert (await capture_row(engine, "cap-1"))["status"] == "HANDED_OFF"
    assert await handoff_records(engine, settings) == [*before, "cap-1"]


async def test_a_replay_counts_only_the_captures_it_handed_off_again(
    topics: Settings, engine: AsyncEngine, qm: Qm
) -> None:
    settings = topics
    await failed_captures(engine, settings, "cap-1", "cap-2")
    # cap-2 is retried by hand first: its dead letter no longer has anything to do
    retried = await qm_captures_retry("cap-2")
    assert retried.exit_code == 0, retried.output
    assert (await capture_row(engine, "cap-2"))["status"] == "RECEIVED"
    before = await handoff_records(engine, settings)

    dry = summary(await qm("replay", "captures", "--dry-run"))
    assert dry[-2:] == [
        "dry run: 2 selected, 1 would be replayed, 0 skipped as already replayed, "
        "1 would not be replayed (their capture is not FAILED); nothing was sent",
        dry[-1],
    ]
    assert "capture cap-2 is RECEIVED, not FAILED" in dry[-1]

    lines = summary(await qm("replay", "captures"))
    assert lines[0] == (
        f"2 selected, 1 replayed to {settings.topic('captures')} (1), 0 skipped as already "
        "replayed, 1 not replayed (their capture is not FAILED)"
    )
    assert "capture cap-2 is RECEIVED, not FAILED; nothing to hand off again" in lines[1]
    assert (await capture_row(engine, "cap-1"))["status"] == "RECEIVED"
    assert await handoff_records(engine, settings) == [*before, "cap-1"]
    # the dead letter left alone is not in the ledger: once cap-2 fails again, a replay takes it
    assert summary(await qm("replay", "captures", "--key", "cap-2", "--dry-run"))[-2].startswith(
        "dry run: 1 selected, 0 would be replayed, 0 skipped as already replayed, 1 would not"
    )


async def qm_captures_retry(capture_id: str) -> Result:
    """`qm captures retry CAPTURE`, in the environment the ``qm`` fixture set."""
    get_settings.cache_clear()
    try:
        return await asyncio.to_thread(CliRunner().invoke, app, ["captures", "retry", capture_id])
    finally:
        get_settings.cache_clear()
