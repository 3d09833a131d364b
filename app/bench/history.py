"""The lease bench's database: its sites and accounts, ``--history`` preloaded, statistics taken,
and the WAL a run writes."""

from __future__ import annotations

import time
from collections.abc import Sequence

from app.crypto import SecretBox
from app.db.engine import make_engine
from app.settings import Settings
from app.store import accounts, bench_history, sites

HISTORY_BATCH = 100_000  # jobs per preload statement
HISTORY_ACCOUNTS = 10_000  # accounts per site that --history adds
HISTORY_SPAN = 6 * 24 * 3600.0  # the preloaded jobs finished over the last six days


# Budgets that never hold a job back (`qm bench lease --budgets`): what they cost is measured, not
# what they do
NEVER_HOLDING_ACCOUNT_BUDGET = 1_000_000_000  # grants an hour
NEVER_HOLDING_GRANTS_PER_MINUTE = 1_000_000


async def make_sites(
    settings: Settings,
    slugs: Sequence[str],
    *,
    accounts_per_site: int,
    lease_seconds: int,
    budgets: bool = False,
) -> None:
    """Sites with ``accounts_per_site`` ACTIVE accounts each and that capacity; with ``budgets``,
    use budgets on that never hold a job back."""
    sealed = SecretBox.from_settings(settings).seal("bench-secret")  # sealing is not measured
    engine = make_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            for slug in slugs:
                await sites.add_site(
                    conn, slug=slug, host=f"{slug}.example.com", capacity=accounts_per_site,
                    lease_seconds=lease_seconds, cooldown_seconds=0,
                    account_budget=NEVER_HOLDING_ACCOUNT_BUDGET if budgets else None,
                    grants_per_minute=NEVER_HOLDING_GRANTS_PER_MINUTE if budgets else None,
                )  # fmt: skip
                for n in range(accounts_per_site):
                    await accounts.add_account(
                        conn, site=slug, username=f"user{n}@{slug}", sealed_secret=sealed
                    )
    finally:
        await engine.dispose()


async def preload(settings: Settings, slugs: Sequence[str], jobs: int) -> float:
    """``jobs`` finished jobs with their grants and inbox rows, and HISTORY_ACCOUNTS accounts per
    site (every tenth INACTIVE); then VACUUM (ANALYZE). The seconds it took."""
    began = time.monotonic()
    sealed = SecretBox.from_settings(settings).seal("bench-secret")
    engine = make_engine(settings, pool_size=1)
    try:
        if jobs:
            async with engine.begin() as conn:
                for slug in slugs:
                    await bench_history.add_accounts(conn, slug, HISTORY_ACCOUNTS, sealed)
        for first in range(1, jobs + 1, HISTORY_BATCH):
            async with engine.begin() as conn:
                last = min(jobs, first + HISTORY_BATCH - 1)
                await bench_history.add_finished_jobs(
                    conn, slugs, first=first, last=last, total=jobs, span=HISTORY_SPAN
                )
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await bench_history.vacuum_analyze(conn)
    finally:
        await engine.dispose()
    return time.monotonic() - began


async def restat(settings: Settings) -> None:
    """``VACUUM (ANALYZE)`` the leasing path's tables again once the warm-up filled them.

    Statistics taken while ``jobs``, ``inbox`` and ``job_grants`` were empty make the planner scan
    them whole, and autovacuum looks at a database only once a minute, longer than a run: the
    runs would measure those scans of tables that grow during them, not a running server's plans.
    """
    engine = make_engine(settings, pool_size=1)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await bench_history.vacuum_analyze(conn)
    finally:
        await engine.dispose()


class WalMeter:
    """WAL bytes the cluster wrote between ``begin`` and ``end`` (every database on the server:
    on a shared server other work counts too).

    ``begin`` takes a checkpoint first, so every run starts where a running server is after
    each of its checkpoints: the first change of each page writes a full-page image. Runs are
    compared on equal terms, whenever the server's own checkpoints happen to fall."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings, pool_size=1)
        self.started = 0

    async def position(self) -> int:
        async with self.engine.connect() as conn:
            return await bench_history.wal_lsn(conn)

    async def begin(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await bench_history.checkpoint(conn)
        self.started = await self.position()

    async def end(self) -> int:
        return await self.position() - self.started

    async def close(self) -> None:
        await self.engine.dispose()
