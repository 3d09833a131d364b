"""`qm captures …` and the capture figures of `qm sites list`, as an operator runs them."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.handoff import Delivery, TargetError
from app.settings import Settings
from app.store import Database
from tests.support.captures import capture_row, outbox_payloads, running_job, submit
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import scalar
from workers.handoff import HandoffWorker
from workers.requests import RequestProcessor


class Refuser:
    name = "refuser"

    async def deliver(self, delivery: Delivery) -> None:
        raise TargetError("refused for good", retryable=False)


async def failed_capture(engine: AsyncEngine, settings: Settings) -> None:
    processor = RequestProcessor(settings, Database(engine))
    lease = await running_job(processor, engine, settings)
    await processor.process(submit(settings, "job-1", lease, "cap-1"))
    await processor.process(submit(settings, "job-1", lease, "cap-2"))
    worker = HandoffWorker(settings, Database(engine), targets=lambda d: [Refuser()])
    assert await worker.hand_off("cap-1") == "failed"


async def test_an_operator_finds_a_failed_capture_and_retries_it(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await failed_capture(engine, settings)
    listed = await qm("captures", "list", "--status", "failed")
    assert listed.exit_code == 0, listed.output
    assert "cap-1" in listed.stdout and "refused for good" in listed.stdout
    assert "cap-2" not in listed.stdout
    shown = await qm("captures", "show", "cap-1")
    assert shown.exit_code == 0, shown.output
    assert "FAILED" in shown.stdout and "refuser: refused for good" in shown.stdout
    sites = await qm("sites", "list")
    assert sites.exit_code == 0, sites.output
    board = next(line for line in sites.stdout.splitlines() if "board" in line)
    assert "1 pending, 1 failed" in board

    retried = await qm("captures", "retry", "cap-1")
    assert retried.exit_code == 0, retried.output
    row = await capture_row(engine, "cap-1")
    assert row["status"] == "RECEIVED" and row["attempts"] == 0
    records = await outbox_payloads(engine, settings.topic("captures"))
    assert records[-1] == {"type": "capture.handoff", "v": 1, "capture_id": "cap-1"}
    event = (await outbox_payloads(engine, settings.topic("events")))[-1]
    assert event["type"] == "capture.retried" and event["reason"].startswith("retried by operator")
    assert_one_red_line(await qm("captures", "retry", "cap-1"), "no FAILED capture")


async def test_qm_captures_refuses_bad_input_in_one_line(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await failed_capture(engine, settings)
    assert_one_red_line(await qm("captures", "list", "--status", "lost"), "unknown status")
    assert_one_red_line(await qm("captures", "show", "nope"), "no capture")
    assert_one_red_line(await qm("captures", "webhook", "board", "ftp://x"), "not an http(s) URL")
    assert_one_red_line(await qm("captures", "webhook", "nowhere", "https://x.example/"), "no site")
    assert_one_red_line(await qm("captures", "webhook", "board"), "--clear")
    hook = "https://hooks.example/captures/T0KEN?key=S3CRET"
    set_ = await qm("captures", "webhook", "board", hook)
    assert set_.exit_code == 0, set_.output
    row = await capture_row(engine, "cap-2")  # the table holds the URL sealed, and its host
    assert row["webhook_shown"] == "https://hooks.example/…"
    assert SecretBox.from_settings(settings).open(bytes(row["webhook_sealed"])) == hook
    assert await scalar(engine, "SELECT count(*) FROM sites WHERE sites::text LIKE '%T0KEN%'") == 0
    shown = await qm("captures", "show", "cap-2")
    for output in (
        set_.stdout,
        shown.stdout,
        (await qm("captures", "show", "cap-2", "--json")).stdout,
    ):
        assert "https://hooks.example/" in output  # what the operator sees: scheme and host
        assert "T0KEN" not in output and "S3CRET" not in output
    assert (await qm("captures", "webhook", "board", "--clear")).exit_code == 0
    row = await capture_row(engine, "cap-2")
    assert row["webhook_shown"] is None and row["webhook_sealed"] is None
