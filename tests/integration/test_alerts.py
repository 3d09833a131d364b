"""Slack alerts from the real processes: a local HTTP server stands in for Slack's webhook."""

from __future__ import annotations

import asyncio
import re
import uuid

from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.devstack import free_port
from app.kafka import client_options, sdk_client
from app.settings import Settings
from app.store.accounts import set_account_status
from schemas.states import AccountStatus
from tests.support.http import get
from tests.support.leasing import make_site
from tests.support.processes import QmProcess
from tests.support.slack import FakeSlack
from tests.support.waiting import eventually

FAST = {"alert_check_seconds": 0.2, "alert_wait_seconds": 1.0}


def alert_settings(settings: Settings, **overrides: object) -> Settings:
    return settings.model_copy(update={**FAST, **overrides})


async def ready(server: QmProcess, port: int) -> None:
    """Every process of ``server`` passes its readiness checks (the alerts consumer has partitions)."""

    async def check() -> bool:
        assert server.proc is not None and server.proc.poll() is None, server.output()
        return (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 200

    await eventually(check, timeout=60)


async def posted(slack: FakeSlack, *fragments: str, timeout: float = 30) -> list[str]:
    """Wait until a post contains each fragment; return every post so far."""

    async def found() -> list[str] | None:
        texts = slack.texts()
        return texts if all(any(f in t for t in texts) for f in fragments) else None

    return await eventually(found, timeout=timeout)


async def test_a_blocked_account_and_a_long_wait_are_posted_once_each_and_their_recovery_too(
    topics: Settings, engine: AsyncEngine
) -> None:
    (account,) = await make_site(engine, topics, capacity=2, n_accounts=1)
    port = free_port()
    with FakeSlack() as slack:
        settings = alert_settings(topics, alert_repeat_seconds=600)
        with QmProcess(settings, "all", metrics_port=port, slack_webhook_url=slack.url) as server:
            await ready(server, port)
            async with sdk_client(settings, request_timeout=30) as client:
                async with client.job(site="board", lease_seconds=60, wait_seconds=30) as job:
                    job.blocked("captcha")  # no cooldown given: the site's (an hour)
                blocked = f"Account {account} of site board is blocked"
                await posted(slack, blocked)

                async def second_collector() -> str:
                    async with client.job(site="board", lease_seconds=60, wait_seconds=60) as job:
                        return job.job_id

                waiter = asyncio.create_task(second_collector())
                await posted(slack, "Site board: 1 job(s) waiting")
                async with engine.begin() as conn:
                    await set_account_status(
                        conn, site="board", username="user0@board", target=AccountStatus.ACTIVE
                    )
                await asyncio.wait_for(waiter, 30)
                texts = await posted(
                    slack,
                    f"Recovered: Account {account} is no longer blocked (",
                    "Recovered: Site board: 1 job(s) waiting",
                )
    assert len([t for t in texts if blocked in t]) == 1  # fired once, however often it was seen
    assert len([t for t in texts if "job(s) waiting" in t and "Recovered" not in t]) == 1
    assert not [t for t in texts if "Dead letters" in t or "Outbox lag" in t]


async def test_outbox_lag_and_dead_letters_are_posted_and_recover_once_a_relay_runs(
    topics: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, topics, capacity=1, n_accounts=1)
    settings = alert_settings(topics, alert_outbox_lag_seconds=1.0, alert_repeat_seconds=3.0)
    port = free_port()
    with (
        FakeSlack() as slack,
        QmProcess(settings, "alerts", metrics_port=port, slack_webhook_url=slack.url) as alerts,
        QmProcess(settings, "worker"),
    ):
        await ready(alerts, port)
        producer = AIOKafkaProducer(**client_options(settings))
        await producer.start()
        try:  # a request no parser accepts: a dead letter (in the outbox, as no relay runs)
            await producer.send_and_wait(
                settings.topic("requests"), b"{not json", key=uuid.uuid4().hex.encode()
            )
        finally:
            await producer.stop()
        await posted(slack, "Outbox lag: 1 row(s) unpublished")
        assert not [t for t in slack.texts() if "Dead letters" in t]
        with QmProcess(settings, "relay"):
            dlt = settings.topic("requests.dlt")
            texts = await posted(
                slack,
                "Recovered: Outbox lag",
                f"Dead letters arrive on {dlt} (latest: ",
                f"Recovered: No new dead letters on {dlt} for 3 s",
            )
    first, *repeats = [t for t in texts if t.startswith(":rotating_light: Outbox lag")]
    assert "still firing" not in first
    # checked every 0.2 s, posted again at most every 3 s, saying how often it fired meanwhile
    assert all(
        re.search(r"\(still firing: ([2-9]|\d\d+)x since the last message\)$", t) for t in repeats
    )
