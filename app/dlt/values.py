"""Values kept by reference: a dead letter too large to carry its record's value names the row of
``dlt_values`` that holds it (``qm.dlt.value_ref``) and its SHA-256. ``restore`` brings the whole
value back for ``qm dlt show`` and ``qm dlt replay``, and checks the digest."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.engine import make_engine
from app.dlt.reader import CONNECT_TIMEOUT_SECONDS, DeadLetter, DltError
from app.settings import Settings
from app.store.dlt_values import StoredValue, fetch_values


class ValueStore:
    """Restores values kept by reference, on ``conn`` or on a connection opened at first need."""

    def __init__(self, settings: Settings, conn: AsyncConnection | None = None) -> None:
        self._settings = settings
        self._conn = conn
        self._engine: AsyncEngine | None = None

    async def restore(self, letters: Sequence[DeadLetter]) -> list[DeadLetter]:
        """``letters`` with every value kept by reference put back in place."""
        refs = [ref for letter in letters if (ref := letter.value_ref) is not None]
        if not refs:
            return list(letters)
        conn = await self._connection()
        try:
            found = await fetch_values(conn, refs)
            await conn.commit()
        except (SQLAlchemyError, OSError) as exc:
            raise DltError(f"PostgreSQL failed reading dlt_values: {type(exc).__name__}") from exc
        return [_restored(letter, found) for letter in letters]

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            self._engine = make_engine(self._settings, pool_size=1)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    self._conn = await self._engine.connect()
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                raise DltError(
                    "PostgreSQL cannot be reached to read the values dead letters keep there"
                ) from exc
        return self._conn

    async def close(self) -> None:
        if self._engine is not None:
            if self._conn is not None:
                await self._conn.close()
            await self._engine.dispose()


def _restored(letter: DeadLetter, found: dict[str, StoredValue]) -> DeadLetter:
    ref = letter.value_ref
    if ref is None:
        return letter
    stored = found.get(ref)
    if stored is None:
        raise DltError(f"{letter.coordinates}: its value {ref} is missing from table dlt_values")
    value = stored.value
    if hashlib.sha256(value).hexdigest() != letter.value_sha256:
        raise DltError(f"{letter.coordinates}: its value {ref} does not match its SHA-256 header")
    return dataclasses.replace(letter, value=value)


@asynccontextmanager
async def open_values(settings: Settings) -> AsyncIterator[ValueStore]:
    """A value store that connects only if a letter needs it."""
    store = ValueStore(settings)
    try:
        yield store
    finally:
        await store.close()
