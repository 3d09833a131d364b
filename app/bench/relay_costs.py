"""The outbox's dead rows and the relay's read, sampled once a second during a relay bench run."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store.outbox import prepare_relay_session
from app.store.outbox_stats import ReadCost, TableStats, read_cost, table_stats

SAMPLE_SECONDS = 1.0


async def sample_outbox(
    settings: Settings, engine: AsyncEngine, samples: list[tuple[TableStats, ReadCost]]
) -> None:
    """Append (table statistics, the cost of one relay read) every second until cancelled."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await prepare_relay_session(conn, name="qm-bench-sampler")
        for _ in range(100_000):  # bounded; the run cancels it long before
            stats = await table_stats(conn)
            cost = await read_cost(conn, settings.outbox_shards, settings.outbox_batch_size)
            samples.append((stats, cost))
            await asyncio.sleep(SAMPLE_SECONDS)  # the sampling period, not a wait for a condition


def describe_samples(samples: Sequence[tuple[TableStats, ReadCost]]) -> str:
    if not samples:
        return "outbox: no samples"
    dead = [stats.dead for stats, _ in samples]
    times = [cost.milliseconds for _, cost in samples]
    buffers = [cost.buffers for _, cost in samples]
    vacuums = samples[-1][0].autovacuums - samples[0][0].autovacuums
    every = max(len(samples) // 12, 1)  # a dozen points of the run: dead rows, read ms
    series = ", ".join(
        f"{stats.dead:,}/{cost.milliseconds:.2f}" for stats, cost in samples[::every]
    )
    return (
        f"outbox over {len(samples)} samples (dead rows/read ms: {series}): dead rows median"
        f" {statistics.median(dead):,.0f} max {max(dead):,}, vacuums {vacuums}; the relay's read median "
        f"{statistics.median(times):.2f} ms max {max(times):.2f} ms, buffers median "
        f"{statistics.median(buffers):,.0f} max {max(buffers):,}"
    )
