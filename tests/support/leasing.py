"""Helpers for leasing tests: sites and accounts in the real database, requests as records."""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from datetime import datetime
from typing import Any

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.sealing import load_public_key, public_key_text, seal_json, unseal
from app.settings import Settings
from app.store import accounts, sites
from schemas.messages import seal_context
from workers.requests import Incoming

CANARY = "canary-s3cr3t-do-not-leak"
# the private key of the test's collector: every start() sends its public half
COLLECTOR_KEY = X25519PrivateKey.generate()
COLLECTOR_PUBLIC_KEY = public_key_text(COLLECTOR_KEY)
# every record made here is a record of its own: it sits at an offset no other one has
OFFSETS = itertools.count()


async def make_site(
    engine: AsyncEngine,
    settings: Settings,
    slug: str = "board",
    *,
    capacity: int = 1,
    n_accounts: int = 1,
    cooldown_seconds: int = 0,
    lease_seconds: int = 60,
    max_attempts: int = 3,
) -> list[int]:
    """A site with ``n_accounts`` ACTIVE accounts whose secrets are the canary; their ids."""
    box = SecretBox.from_settings(settings)
    ids = []
    async with engine.begin() as conn:
        await sites.add_site(
            conn,
            slug=slug,
            host=f"{slug}.example.com",
            capacity=capacity,
            lease_seconds=lease_seconds,
            cooldown_seconds=cooldown_seconds,
            max_attempts=max_attempts,
        )
        for n in range(n_accounts):
            row = await accounts.add_account(
                conn, site=slug, username=f"user{n}@{slug}", sealed_secret=box.seal(f"{CANARY}-{n}")
            )
            assert row is not None
            ids.append(int(row["id"]))
    return ids


async def make_unreadable_site(engine: AsyncEngine, settings: Settings, slug: str) -> None:
    """A site whose one account's secret is sealed with a key the worker does not have (one
    since dropped from QM_SECRET_KEYS): a job.start there is rejected ``account_unreadable``."""
    await make_site(engine, settings, slug, n_accounts=0)
    foreign = SecretBox(Fernet.generate_key().decode())
    async with engine.begin() as conn:
        await accounts.add_account(
            conn, site=slug, username=f"lost@{slug}", sealed_secret=foreign.seal(CANARY)
        )


async def make_failing_site(engine: AsyncEngine, settings: Settings, slug: str) -> None:
    """A site where every job.start fails unexpectedly: the database refuses to queue a job
    there (a trigger raises), as an error no retry mends would."""
    await make_site(engine, settings, slug)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION refuse_job() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'no job may be queued on this site'; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER refuse_{slug.replace('-', '_')} BEFORE INSERT ON jobs "
                f"FOR EACH ROW WHEN (NEW.site = '{slug}') EXECUTE FUNCTION refuse_job()"
            )
        )


def request(
    settings: Settings, type_: str, job_id: str, *, request_id: str | None = None, **fields: Any
) -> Incoming:
    """A request record as the claim worker reads it from qm.requests."""
    body = {
        "type": type_,
        "v": 1,
        "request_id": request_id or str(uuid.uuid4()),
        "job_id": job_id,
        **fields,
    }
    return Incoming(
        topic=settings.topic("requests"),
        partition=0,
        offset=next(OFFSETS),
        timestamp_ms=0,
        key=job_id.encode(),
        value=json.dumps(body).encode(),
        headers=[("correlation_id", body["request_id"].encode())],
    )


def retried(record: Incoming) -> Incoming:
    """The same request sent again by its client: a new record, at an offset of its own."""
    return dataclasses.replace(record, offset=next(OFFSETS))


def start(settings: Settings, job_id: str, site: str = "board", **fields: Any) -> Incoming:
    fields.setdefault("collector", "test-collector")
    fields.setdefault("wait_seconds", 60)
    fields.setdefault("public_key", COLLECTOR_PUBLIC_KEY)
    return request(settings, "job.start", job_id, site=site, **fields)


def cancel(settings: Settings, job_id: str, **fields: Any) -> Incoming:
    """A ``job.cancel`` as its requester sends it: naming the public key its start named."""
    fields.setdefault("public_key", COLLECTOR_PUBLIC_KEY)
    return request(settings, "job.cancel", job_id, **fields)


def opened_secret(grant: dict[str, Any], key: X25519PrivateKey = COLLECTOR_KEY) -> str:
    """The account secret of a ``job.granted``, opened as its collector does."""
    context = seal_context("account.secret", grant["job_id"])
    return unseal(key, grant["account"]["secret"], context).decode()


def opened_session(grant: dict[str, Any], key: X25519PrivateKey = COLLECTOR_KEY) -> Any:
    """The storage state of a ``job.granted``, opened as its collector does."""
    context = seal_context("session.storage_state", grant["job_id"])
    return json.loads(unseal(key, grant["session"]["storage_state"], context))


def lease_fields(grant: dict[str, Any], key: X25519PrivateKey = COLLECTOR_KEY) -> dict[str, Any]:
    """What every follow-up of a ``job.granted`` presents: its token, and its lease secret
    opened as its collector does."""
    context = seal_context("lease.secret", grant["job_id"])
    secret = unseal(key, grant["lease_secret"], context).decode()
    return {"lease_token": grant["lease_token"], "lease_secret": secret}


async def held_lease(engine: AsyncEngine, settings: Settings, job_id: str) -> dict[str, Any]:
    """``lease_fields`` of the job's latest grant, as the outbox holds it."""
    grants = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    assert grants, f"{job_id} was never granted"
    return lease_fields(grants[-1])


def sealed_state(state: dict[str, Any], field: str, job_id: str, upload_key: str) -> str:
    """A storage state sealed to Quartermaster, as a collector sends it."""
    return seal_json(load_public_key(upload_key), state, seal_context(field, job_id))


async def replies(
    engine: AsyncEngine, settings: Settings, job_id: str | None = None
) -> list[dict[str, Any]]:
    """Replies written to the outbox for the replies topic, in order (optionally for one job)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key, payload FROM outbox WHERE topic = :topic ORDER BY id"),
            {"topic": settings.topic("replies")},
        )
        out = [json.loads(bytes(payload)) for key, payload in rows]
    return [r for r in out if job_id is None or r.get("job_id") == job_id]


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def db_now(engine: AsyncEngine) -> datetime:
    """The database clock's now (every state change reads its time from there)."""
    value = await scalar(engine, "SELECT now()")
    assert isinstance(value, datetime)
    return value
