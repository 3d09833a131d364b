"""A capture's handoff and a dead-letter replay over the secured transport: the collector submits,
the handoff worker hands off, Airflow's principal reads what it waits on; ``qm dlt replay``
connects as the service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from aiokafka import AIOKafkaConsumer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.kafka_acls import AIRFLOW, COLLECTOR
from app.settings import Settings
from tests.secured.conftest import SecuredStack, as_principal
from tests.support.captures import capture_body
from tests.support.dead_letters import read_topic, sample, write_dead_letters
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess, settings_env


async def test_secured_capture_is_handed_off_and_read_by_airflows_principal(
    topics: Settings, engine: AsyncEngine, secured_stack: SecuredStack
) -> None:
    settings = topics
    await make_site(engine, settings)
    collector = as_principal(settings, secured_stack, COLLECTOR)
    airflow = AIOKafkaConsumer(
        settings.topic("captures.ready"), group_id=f"{AIRFLOW}-captures",
        auto_offset_reset="earliest", enable_auto_commit=False, **secured_stack.options(AIRFLOW),
    )  # fmt: skip
    with QmProcess(settings, "all") as server:
        async with (
            sdk_client(collector, collector="secured-capturer") as client,
            client.job(site="board", wait_seconds=30, timeout=60) as job,
        ):
            assert await job.submit_capture(**capture_body("cap-secured")) == "cap-secured"
        await airflow.start()
        try:
            ready = await asyncio.wait_for(airflow.getone(), 60)
        finally:
            await airflow.stop()
        assert server.proc is not None and server.proc.poll() is None, server.output()[-3000:]
    assert json.loads(ready.value or b"{}")["capture_id"] == "cap-secured"
    assert await scalar(engine, "SELECT status::text FROM captures") == "HANDED_OFF"


async def test_secured_dead_letter_replay_runs_as_the_service(
    topics: Settings, engine: AsyncEngine, secured_stack: SecuredStack
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    written = await write_dead_letters(settings, dlt, sample(settings))
    chosen = [w for w in written if w.letter.error_class.endswith("InvalidMessage")]

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "dlt", "replay", dlt, "--error-class", "InvalidMessage"],
        env=settings_env(settings), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(chosen)} selected, {len(chosen)} replayed" in done.stdout
    copies = await read_topic(settings, settings.topic("requests"))
    assert sorted(value for _, value, _ in copies) == sorted(w.letter.value for w in chosen)
    assert await scalar(engine, "SELECT count(*) FROM dlt_replays") == len(chosen)
    for password in secured_stack.security.users.values():
        assert password not in done.stdout + done.stderr
