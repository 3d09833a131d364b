"""Statements sent to the database on an engine's connections, counted by their first words."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

# asyncpg's look-up of a type a connection has not met yet (an enum, an array; it turns jit off
# around it): once per connection and type, not per request
INTROSPECTION = ("typeinfo_tree", "'jit'")


def words(sql: str) -> str:
    """A statement by its first words (BEGIN and COMMIT by their first)."""
    first = sql.split()[:3]
    return first[0].rstrip(";") if first[0].rstrip(";") in ("BEGIN", "COMMIT") else " ".join(first)


class Statements:
    """Counts every statement sent on an engine's connections, by its first words: those
    SQLAlchemy sends (its events) and those asyncpg sends itself (its query logger: BEGIN,
    COMMIT and the hot statements of app.store.prepared)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.counts: Counter[str] | None = None
        event.listen(engine.sync_engine, "before_cursor_execute", self._sqlalchemy)
        event.listen(engine.sync_engine, "connect", self._connected)

    def _connected(self, dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(self._asyncpg)

    def _sqlalchemy(self, conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        self._note(sql)

    def _asyncpg(self, logged: Any) -> None:
        self._note(logged.query)

    def _note(self, sql: str) -> None:
        if self.counts is not None and not any(mark in sql for mark in INTROSPECTION):
            self.counts[words(sql)] += 1

    @contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        self.counts = Counter()
        try:
            yield self.counts
        finally:
            self.counts = None
