"""The benches' database: the lease bench's sites and accounts, ``--history`` preloaded (shared by
`qm bench lease`, `seeds` and `captures`), statistics taken, and the WAL a run writes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.crypto import SecretBox
from app.db.engine import make_engine
from app.settings import Settings
from app.store import accounts, bench_history, sites
from app.store.bench_history import HOLDS_PER_SEED

HISTORY_BATCH = 100_000  # jobs per preload statement
HISTORY_ACCOUNTS = 10_000  # accounts per site that --history adds
HISTORY_SPAN = 6 * 24 * 3600.0  # the preloaded jobs finished over the last six days
HISTORY_HELP = (
    "Finished jobs preloaded first, each with its grant, inbox row and a delivered capture; "
    "with settled seeds (a tenth as many, their holds and domain rows) and 10,000 accounts a site."
)


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


@dataclass(frozen=True, slots=True)
class Preloaded:
    """What ``preload`` wrote and how long each part took."""

    jobs: int = 0
    seeds: int = 0
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # seconds, by part
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # rows, bytes by table

    def line(self) -> str:
        """One line for the bench's header: rows, time, seconds per million rows, disk."""
        rows = sum(r for r, _ in self.sizes.values())
        size = sum(b for _, b in self.sizes.values())
        parts = ", ".join(f"{name} {took:.0f} s" for name, took in self.parts.items())
        per_million = self.seconds / (rows / 1e6) if rows else 0.0
        return (
            f"preloaded {self.jobs:,} finished jobs (grant, inbox row, delivered capture each) "
            f"and {self.seeds:,} settled seeds ({HOLDS_PER_SEED} holds each): {rows:,} rows, "
            f"{size / 2**30:.1f} GiB, in {self.seconds:.0f} s ({parts}; "
            f"{per_million:.1f} s per million rows)"
        )


async def preload(settings: Settings, slugs: Sequence[str], jobs: int) -> Preloaded:
    """History in every table the hot paths touch, for ``jobs`` finished jobs: each with its
    grant, inbox row and a delivered capture; ``seed_count`` settled seeds with their holds and
    domain rows; HISTORY_ACCOUNTS accounts per site (every tenth INACTIVE). Then VACUUM (ANALYZE)
    of those tables (even without history, so no run is planned on a never-analyzed database)."""
    began = time.monotonic()
    parts: dict[str, float] = {}
    seeds = bench_history.seed_count(jobs, len(slugs)) if jobs else 0
    sealed = SecretBox.from_settings(settings).seal("bench-secret")
    engine = make_engine(settings, pool_size=1)
    try:
        if jobs:
            async with engine.begin() as conn:
                for slug in slugs:
                    await bench_history.add_accounts(conn, slug, HISTORY_ACCOUNTS, sealed)
                await bench_history.add_rewrites(conn, slugs)
        part = time.monotonic()
        for first, last in _batches(jobs):
            async with engine.begin() as conn:
                await bench_history.add_finished_jobs(
                    conn, slugs, first=first, last=last, total=jobs, span=HISTORY_SPAN,
                    captures=True,
                )  # fmt: skip
        parts["jobs"] = time.monotonic() - part
        part = time.monotonic()
        for first, last in _batches(seeds, HISTORY_BATCH // HOLDS_PER_SEED):
            async with engine.begin() as conn:
                await bench_history.add_settled_seeds(
                    conn, slugs, first=first, last=last, seeds=seeds, jobs=jobs,
                    span=HISTORY_SPAN,
                )  # fmt: skip
        parts["seeds"] = time.monotonic() - part
        part = time.monotonic()
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await bench_history.vacuum_analyze(conn)
            sizes = await bench_history.table_sizes(conn)
        parts["vacuum"] = time.monotonic() - part
    finally:
        await engine.dispose()
    return Preloaded(jobs, seeds, time.monotonic() - began, parts, sizes)


def _batches(count: int, size: int = 0) -> list[tuple[int, int]]:
    """``1..count`` in ranges of ``size`` (HISTORY_BATCH by default), one statement each."""
    size = size or HISTORY_BATCH
    return [(first, min(count, first + size - 1)) for first in range(1, count + 1, size)]


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
