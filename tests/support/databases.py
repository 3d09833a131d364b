"""A database of a test's own on the test server, for migrations run step by step."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy.engine import make_url

from tests.conftest import asyncpg_dsn


@contextlib.asynccontextmanager
async def empty_database(admin_url: str) -> AsyncIterator[str]:
    """A new, empty database (no migration applied), dropped afterwards; its URL."""
    name = f"qm_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
