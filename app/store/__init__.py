"""Every SQL statement of Quartermaster: one module per aggregate, one function per transition."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.engine import make_engine
from app.settings import Settings
from app.store.rows import Row

# The connection a transaction runs on; workers and reapers pass it along without touching SQL.
Conn = AsyncConnection
# A row as the store returns it, read by column name (``app.store.prepared.Row``): the one row
# type of the store, whichever way its statement ran.
__all__ = ["Conn", "Database", "Row"]


class Database:
    """The engine of one process; ``transaction()`` is the unit every request and sweep runs in."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    def from_settings(
        cls, settings: Settings, pool_size: int | None = None, *, pre_ping: bool = True
    ) -> Database:
        return cls(make_engine(settings, pool_size=pool_size, pre_ping=pre_ping))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A transaction that commits when the block ends and rolls back if it raises."""
        async with self.engine.begin() as conn:
            yield conn

    async def ping(self) -> None:
        """Raise unless the database answers."""
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def close(self) -> None:
        await self.engine.dispose()
