"""What the benchmark reads of the outbox table: its dead rows and the cost of the relay's read."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.outbox import _FETCH_UNSENT


@dataclass(frozen=True, slots=True)
class TableStats:
    """The outbox's rows by the statistics collector, and how often it was vacuumed."""

    live: int
    dead: int
    autovacuums: int


@dataclass(frozen=True, slots=True)
class ReadCost:
    """One execution of the relay's read: its time in the server and the buffers it touched."""

    milliseconds: float
    buffers: int


_TABLE_STATS = text(
    """
    SELECT n_live_tup, n_dead_tup, autovacuum_count + vacuum_count AS vacuums
    FROM pg_stat_user_tables WHERE relname = 'outbox'
    """
)


async def table_stats(conn: AsyncConnection) -> TableStats:
    row = (await conn.execute(_TABLE_STATS)).one()
    return TableStats(int(row.n_live_tup), int(row.n_dead_tup), int(row.vacuums))


async def read_cost(conn: AsyncConnection, shards: int, limit: int) -> ReadCost:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the relay's read of every shard (on a session prepared
    as the relay's: the plan depends on it)."""
    plan = await conn.scalar(
        text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {_FETCH_UNSENT.text}"),
        {"shards": list(range(shards)), "limit": limit, "skip_topics": [], "busy": []},
    )
    top = (json.loads(plan) if isinstance(plan, str) else plan)[0]
    node = top["Plan"]  # the top node counts the buffers of the nodes under it
    buffers = int(node.get("Shared Hit Blocks", 0)) + int(node.get("Shared Read Blocks", 0))
    return ReadCost(float(top["Execution Time"]), buffers)
