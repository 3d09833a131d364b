"""The handoff worker's batches against the real database: one statement claims a batch's
captures, those whose targets answer at once are finalised in one transaction, a slow target
holds back only its own capture, and duplicate records hand a capture off once."""

from __future__ import annotations

import asyncio
import itertools

from cryptography.fernet import Fernet
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.handoff import Delivery
from app.settings import Settings
from app.store import Database, captures
from schemas.messages import CaptureHandoff
from tests.support.captures import capture_row, outbox_payloads, running_job, submit
from tests.support.leasing import lease_fields, make_site, replies, start
from tests.support.waiting import eventually
from workers.consuming import Incoming
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor

OFFSETS = itertools.count(1_000)


def handoff_record(settings: Settings, capture_id: str) -> Incoming:
    """A record of qm.captures as the handoff worker reads it."""
    value = CaptureHandoff(capture_id=capture_id).model_dump_json().encode()
    return Incoming(settings.topic("captures"), 0, next(OFFSETS), 0, capture_id.encode(), value)


def batches_so_far() -> tuple[float, float]:
    """(batches, records) the handoff batches metric counted in this process."""
    labels = {"committed": "true"}
    count = REGISTRY.get_sample_value("qm_handoff_captures_per_batch_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("qm_handoff_captures_per_batch_sum", labels) or 0.0


async def captures_of_a_job(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, count: int
) -> list[str]:
    lease = await running_job(processor, engine, settings)
    ids = [f"cap-{n}" for n in range(count)]
    await asyncio.gather(*(processor.process(submit(settings, "job-1", lease, c)) for c in ids))
    return ids


async def test_captures_handed_over_together_go_in_batches_and_each_is_handed_off_once(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(update={"handoff_batch_max": 8, "handoff_batches": 2})
    ids = await captures_of_a_job(processor, engine, settings, 24)
    worker = HandoffWorker(settings, Database(engine))
    before = batches_so_far()
    records = [handoff_record(settings, c) for c in ids + ids[:4]]  # four records twice
    outcomes = await asyncio.gather(*(worker.enqueue(record) for record in records))
    await worker.drain()
    assert sorted(outcomes) == ["handed_off"] * 24 + ["skipped"] * 4
    for capture_id in ids:
        assert (await capture_row(engine, capture_id))["status"] == "HANDED_OFF"
    ready = await outbox_payloads(engine, settings.topic("captures.ready"))
    assert sorted(r["capture_id"] for r in ready) == sorted(ids)  # once each
    batches, carried = (now - then for now, then in zip(batches_so_far(), before, strict=True))
    assert carried == 28
    assert batches <= 6  # eight at a time; the repeats wait for their first records' batch


class Slow:
    """A target that answers ``slow`` captures only once released; the others at once."""

    name = "slow"

    def __init__(self, slow: str) -> None:
        self.slow = slow
        self.released = asyncio.Event()

    async def deliver(self, delivery: Delivery) -> None:
        if delivery.capture_id == self.slow:
            await asyncio.wait_for(self.released.wait(), 30)


async def test_a_slow_target_holds_back_only_its_own_capture_of_the_batch(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    settings = settings.model_copy(update={"handoff_batch_max": 8, "handoff_batches": 1})
    ids = await captures_of_a_job(processor, engine, settings, 6)
    target = Slow(ids[0])
    worker = HandoffWorker(settings, Database(engine), targets=lambda delivery: [target])
    outcomes = [worker.enqueue(handoff_record(settings, c)) for c in ids]

    async def the_others_done() -> bool:
        rows = [await capture_row(engine, c) for c in ids[1:]]
        return all(row["status"] == "HANDED_OFF" for row in rows)

    await eventually(the_others_done, timeout=15)
    # every record has its outcome: the slow one's claim is in the database, renewed meanwhile
    settled = await asyncio.wait_for(asyncio.gather(*outcomes), 5)
    assert settled == ["handing_off"] + ["handed_off"] * 5
    assert (await capture_row(engine, ids[0]))["status"] == "HANDING_OFF"
    target.released.set()

    async def slow_one_done() -> bool:
        return (await capture_row(engine, ids[0]))["status"] == "HANDED_OFF"

    await eventually(slow_one_done, timeout=15)
    await worker.drain(10)
    ready = await outbox_payloads(engine, settings.topic("captures.ready"))
    assert sorted(r["capture_id"] for r in ready) == sorted(ids)


async def test_an_undeliverable_capture_fails_its_own_attempt_not_its_batch(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    """A site whose webhook no key opens: its capture goes back for another attempt with the
    reason; the batch's other captures are handed off."""
    lease = await running_job(processor, engine, settings)
    await make_site(engine, settings, "locked", capacity=1, n_accounts=1)
    async with engine.begin() as conn:
        sealed = SecretBox(Fernet.generate_key().decode()).seal("https://hooks.example/t")
        await captures.set_site_webhook(conn, "locked", "https://hooks.example", sealed)
    assert await processor.process(start(settings, "job-2", site="locked")) == "replied"
    [grant] = [r for r in await replies(engine, settings, "job-2") if r["type"] == "job.granted"]
    await processor.process(submit(settings, "job-2", lease_fields(grant), "cap-locked"))
    ids = ["cap-0", "cap-1", "cap-2"]
    for capture_id in ids:
        await processor.process(submit(settings, "job-1", lease, capture_id))
    worker = HandoffWorker(settings, Database(engine))
    records = [handoff_record(settings, c) for c in ["cap-locked", *ids]]
    outcomes = await asyncio.gather(*(worker.enqueue(record) for record in records))
    assert outcomes == ["retrying", "handed_off", "handed_off", "handed_off"]
    row = await capture_row(engine, "cap-locked")
    assert row["status"] == "RECEIVED" and row["attempts"] == 1
    assert row["last_error"].startswith("delivery: ")
