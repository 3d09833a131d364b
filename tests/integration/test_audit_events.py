"""The events `qm audit` reads carry the history: each lease transition its job, account, site,
token, expiry and the database's clock; seeds their token; a capture's hand-off its token."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.leases import revoke
from app.core.transaction import Tx, TxServices
from app.crypto import SecretBox
from app.settings import Settings
from app.store import Database, seeds
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import db_now, lease_fields, make_site, replies, request, start
from workers.requests import RequestProcessor


async def events(engine: AsyncEngine, settings: Settings) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :t ORDER BY id"),
            {"t": settings.topic("events")},
        )
        return [json.loads(bytes(payload)) for (payload,) in rows]


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_audit_lease_events_carry_account_token_expiry_and_the_database_clock(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    [account] = await make_site(engine, settings, capacity=2)
    async with engine.begin() as conn:
        await seeds.add_seed(
            conn, site="board", url="https://board.example.com/1", interval_seconds=60, priority=0
        )
    before = await db_now(engine)
    await processor.process(start(settings, "j1", needs={"account": True, "seeds": 1}))
    grant = (await replies(engine, settings, "j1"))[-1]
    lease = lease_fields(grant)
    await processor.process(request(settings, "job.heartbeat", "j1", **lease, extend_seconds=120))
    await processor.process(request(settings, "job.finish", "j1", **lease, outcome="succeeded"))
    await processor.process(start(settings, "j2"))
    later = await db_now(engine)

    history = {
        e["type"]: e for e in await events(engine, settings) if e.get("job_id", e["id"]) == "j1"
    }
    granted, extended = history["job.granted"], history["job.extended"]
    finished = history["job.finished"]
    token = grant["lease_token"]
    for event in (granted, extended, finished):
        assert event["id"] == "j1" and event["site"] == "board"
        assert event["lease_token"] == token and event["account_id"] == str(account)
        assert before <= at(event["db_at"]) <= later  # the database's clock, not the process's
    assert granted["capacity"] == 2
    assert at(granted["db_at"]) == at(grant["granted_at"])
    assert at(granted["lease_expires_at"]) == at(grant["lease_expires_at"])
    assert at(extended["lease_expires_at"]) > at(granted["lease_expires_at"])
    assert at(granted["db_at"]) < at(extended["db_at"]) < at(finished["db_at"])
    assigned, released = history["seed.assigned"], history["seed.released"]
    assert assigned["lease_token"] == released["lease_token"] == token
    assert at(granted["db_at"]) < at(assigned["db_at"]) < at(extended["db_at"])
    assert at(finished["db_at"]) < at(released["db_at"])
    second = [e for e in await events(engine, settings) if e["id"] == "j2"]
    assert second[-1]["type"] == "job.granted" and second[-1]["lease_token"] > token


async def test_audit_an_expiry_and_a_revoke_carry_the_lease_they_end(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings, db: Database
) -> None:
    [account] = await make_site(engine, settings, lease_seconds=30)
    await processor.process(start(settings, "lapsing"))
    token = (await replies(engine, settings, "lapsing"))[-1]["lease_token"]
    result = await ExpiredLeases(settings, db).run_once(
        now=await db_now(engine) + timedelta(minutes=5)
    )
    assert result.changed
    await processor.process(start(settings, "revoked"))
    revoked_token = (await replies(engine, settings, "revoked"))[-1]["lease_token"]
    async with engine.begin() as conn:
        tx = Tx(conn, TxServices(settings, SecretBox.from_settings(settings)))
        assert await revoke(tx, "revoked", "operator") is not None
        await tx.flush()
    history = {e["type"]: e for e in await events(engine, settings)}
    expired, gone = history["job.expired"], history["job.revoked"]
    assert (expired["lease_token"], expired["account_id"]) == (token, str(account))
    assert (gone["lease_token"], gone["account_id"]) == (revoked_token, str(account))
    assert at(expired["db_at"]) > at(expired["lease_expires_at"])
    assert "db_at" in gone and "lease_expires_at" in gone
