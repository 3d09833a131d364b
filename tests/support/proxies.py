"""Helpers for proxy and account-health tests: proxies in the real database, events as written."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.proxy_urls import proxy_label
from app.settings import Settings
from app.store import proxies, sites

PROXY_PASSWORD = "proxy-pa55-do-not-leak"


def proxy_url(n: int) -> str:
    """The URL of the test's proxy ``n``, with credentials."""
    return f"http://user{n}:{PROXY_PASSWORD}@10.0.0.{n}:3128"


async def make_proxies(
    engine: AsyncEngine,
    settings: Settings,
    site: str = "board",
    n: int = 1,
    *,
    max_accounts: int = 1,
    cooldown_seconds: int = 0,
    block_after: int = 3,
    first: int = 1,
) -> list[int]:
    """``n`` ACTIVE proxies of ``site`` (URLs sealed as `qm proxies add` seals them); their ids."""
    box = SecretBox.from_settings(settings)
    ids = []
    async with engine.begin() as conn:
        for k in range(first, first + n):
            row = await proxies.add_proxy(
                conn,
                site=site,
                label=proxy_label(proxy_url(k)),
                url_sealed=box.seal(proxy_url(k)),
                max_accounts=max_accounts,
                cooldown_seconds=cooldown_seconds,
                block_after=block_after,
            )
            assert row is not None
            ids.append(int(row["id"]))
    return ids


async def set_site(engine: AsyncEngine, site: str, **changes: Any) -> None:
    async with engine.begin() as conn:
        assert await sites.update_site(conn, site, changes) is not None


async def events(engine: AsyncEngine, settings: Settings, type_: str) -> list[dict[str, Any]]:
    """The events of ``type_`` written to the outbox for qm.events, in order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :topic ORDER BY id"),
            {"topic": settings.topic("events")},
        )
        found = [json.loads(bytes(payload)) for (payload,) in rows]
    return [e for e in found if e["type"] == type_]


async def grant_history(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Every grant: its token, job, account and proxy, in token order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT lease_token, job_id, account_id, proxy_id, granted_at, ended_at "
                "FROM job_grants ORDER BY lease_token"
            )
        )
        return [dict(row) for row in rows.mappings()]
