"""The statements every request runs, sent by asyncpg beneath SQLAlchemy, in its transaction.

Through SQLAlchemy Core a statement costs the claim worker about 80-110 µs of CPU besides
asyncpg's own 25-30 µs (an execution context, result metadata, a greenlet per call); with
several such statements per request that was a fifth of the worker's CPU (docs/performance.md,
"Profile"). A ``Prepared`` statement is compiled once, by SQLAlchemy's asyncpg dialect, from the same
``text()`` construct, and sent on the connection's asyncpg connection with asyncpg's prepared
statement cache. It runs only inside a transaction SQLAlchemy has begun on the database: before
the first statement of a transaction (SQLAlchemy begins lazily, with its first statement) and
outside one, it goes through SQLAlchemy like any other. A database error is raised as
SQLAlchemy's ``DBAPIError`` around asyncpg's, as SQLAlchemy raises it, without the parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row

_DIALECT = asyncpg_dialect()


class Prepared:
    """One statement, compiled once; ``rows`` and ``first`` run it in the caller's transaction."""

    def __init__(self, clause: TextClause) -> None:
        compiled = clause.compile(dialect=_DIALECT)
        self.clause = clause
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup or ())

    async def rows(self, conn: AsyncConnection, params: Mapping[str, Any]) -> list[Row]:
        """The statement's rows, each a dict by column name."""
        driver = _driver(conn)
        if driver is None:
            result = await conn.execute(self.clause, dict(params))
            return [dict(row) for row in result.mappings()]
        try:
            records = await driver.fetch(self.sql, *[params[name] for name in self.names])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise DBAPIError(self.sql, None, exc, hide_parameters=True) from exc
        return [dict(record) for record in records]

    async def execute(self, conn: AsyncConnection, params: Mapping[str, Any]) -> None:
        """Run a statement that returns no rows."""
        driver = _driver(conn)
        if driver is None:
            await conn.execute(self.clause, dict(params))
            return
        try:
            await driver.execute(self.sql, *[params[name] for name in self.names])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise DBAPIError(self.sql, None, exc, hide_parameters=True) from exc

    async def first(self, conn: AsyncConnection, params: Mapping[str, Any]) -> Row | None:
        """The statement's first row; None when it returned none."""
        rows = await self.rows(conn, params)
        return rows[0] if rows else None


def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn`` when it is in a transaction on the database; None
    otherwise (not yet begun, none at all, closed or invalidated: SQLAlchemy deals with those)."""
    sync = conn.sync_connection
    if sync is None or sync.closed or sync.invalidated:
        return None
    driver = sync.connection.driver_connection
    return driver if driver is not None and driver.is_in_transaction() else None
