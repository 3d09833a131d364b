"""`qm bench seeds`: the seed claim on a small and a huge site, and the import's rate.

Against a real, durable PostgreSQL (started here unless ``DATABASE_URL`` names one), in one run:

- claim latency and claims per second, for 1 and for ``--concurrency`` claimers at once, on a
  site of ``--small`` seeds and on one of ``--large`` seeds. A claim is the transaction the claim
  worker runs for ``seeds.claim`` without Kafka and the inbox: the fenced claim CTE, the site's
  domain rewrites, the events into the outbox, COMMIT. Each claimer holds a live lease of its
  own and, after each claim, reports its seeds done and due again at once (timed apart, printed
  beside), so the small site never runs dry; claims per second count these claim-and-settle
  cycles of all claimers together;
- with ``--history N``, the sites' history preloaded first, as `qm bench lease --history N` does
  (``app.bench.history.preload``): N finished jobs with grants, inbox rows and delivered
  captures, and N/10 settled seeds of these sites (done, not due again yet; a priority level
  above the due ones) with their holds and domain rows;
- the time to import ``--import-rows`` seeds as `qm seeds import` does: CSV lines parsed,
  COPYed into a temporary table in batches, one upsert, COMMIT.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console
from rich.table import Table

from app.bench import history
from app.bench.services import services as start_services
from app.core import seeds as seeding
from app.core.transaction import Tx, TxServices
from app.crypto import SecretBox
from app.db.engine import make_engine
from app.lease_secrets import lease_secret_hash, new_lease_secret
from app.logs import configure_logging
from app.sealing import public_key_text
from app.seed_files import parse_rows
from app.settings import Settings
from app.store import Database, Row, domains, jobs, seeds, sites
from schemas.messages import SeedResult

console = Console(width=max(Console().width, 120))
# the bench's jobs need no account; every start still names a key (the grant seals to it)
BENCH_PUBLIC_KEY = public_key_text(X25519PrivateKey.generate())
Opt = typer.Option
LEASE_SECONDS = 3600  # no lease lapses inside a run
CLAIM_SIZE = 5
PRIORITIES = 4  # the seeds' priority levels


@dataclass
class Samples:
    claims: list[float] = field(default_factory=list)
    settles: list[float] = field(default_factory=list)
    seconds: float = 0.0


def bench_seeds(
    small: Annotated[int, Opt(help="Seeds of the small site.")] = 1_000,
    large: Annotated[int, Opt(help="Seeds of the large site.")] = 1_000_000,
    concurrency: Annotated[int, Opt(help="Claimers of the concurrent runs.")] = 8,
    seconds: Annotated[float, Opt(help="Length of each claim run.")] = 5.0,
    import_rows: Annotated[int, Opt(help="Seeds the import run loads.")] = 100_000,
    history_jobs: Annotated[int, Opt("--history", help=history.HISTORY_HELP)] = 0,
) -> None:
    """Seed claim latency and rate on a small and a large site; the import's seeds per second."""
    configure_logging("console", "WARNING")  # an info line per claim would drown the table
    with start_services(kafka=False) as found:
        settings = Settings(
            database_url=found.database_url, secret_keys=_key(), transport_key=_key()
        )
        console.print(
            f"seeds bench: claims of {CLAIM_SIZE} on sites of {small:,} and {large:,} seeds, "
            f"1 and {concurrency} claimers, {seconds:g} s each; PostgreSQL {found.durability}"
        )
        sizes = {"small": small, "large": large}
        asyncio.run(_bench(settings, sizes, concurrency, seconds, import_rows, history_jobs))


def _key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


async def _bench(
    settings: Settings,
    sizes: dict[str, int],
    concurrency: int,
    seconds: float,
    rows: int,
    history_jobs: int,
) -> None:
    db = Database(make_engine(settings, pool_size=concurrency + 2, pre_ping=False))
    services = TxServices(settings, SecretBox.from_settings(settings))
    try:
        table = Table(
            "site",
            "claimers",
            "claims",
            "claims/s",
            "claim p50 ms",
            "claim p99 ms",
            "settle p50 ms",
        )
        for slug, count in sizes.items():
            started = time.perf_counter()
            await _make_site(db, slug, count)
            console.print(
                f"site {slug}: {count:,} seeds made in {time.perf_counter() - started:.1f} s"
            )
        # the sites' history: settled seeds (not due) beside the due ones, and jobs, captures
        loaded = await history.preload(settings, list(sizes), history_jobs)
        if history_jobs:
            console.print(loaded.line())
        for slug in sizes:
            for claimers in (1, concurrency):
                await _vacuum(db)
                samples = await _claim_run(db, services, slug, claimers, seconds)
                table.add_row(slug, str(claimers), *_row(samples))
        console.print(table)
        await _import_run(db, rows)
    finally:
        await db.close()


async def _make_site(db: Database, slug: str, count: int) -> None:
    """The site, its seeds, and one domain rewrite that every URL goes through."""
    async with db.transaction() as conn:
        await sites.add_site(
            conn,
            slug=slug,
            host=f"{slug}.example.com",
            capacity=1_000_000,
            lease_seconds=LEASE_SECONDS,
        )
        await seeds.generate_seeds(conn, slug, count, priorities=PRIORITIES)
        await domains.add_rewrite(
            conn, site=slug, from_host=f"{slug}.example.com", to_host=f"{slug}.example.net"
        )


async def _vacuum(db: Database) -> None:
    async with db.engine.connect() as conn:
        await seeds.vacuum_seeds(await conn.execution_options(isolation_level="AUTOCOMMIT"))


async def _lease(db: Database, slug: str) -> Row:
    """A live lease on the site for a job that needs no account."""
    async with db.transaction() as conn:
        await sites.lock_site(conn, slug)
        await jobs.queue_job(
            conn,
            job_id=f"{slug}-{uuid.uuid4().hex[:12]}",
            site=slug,
            collector="bench",
            needs_account=False,
            needs_seeds=0,
            lease_seconds=LEASE_SECONDS,
            wait_seconds=60,
            request_id=str(uuid.uuid4()),
            reply_to="bench",
            correlation_id="bench",
            public_key=BENCH_PUBLIC_KEY,
        )
        # the bench presents the stored hash itself: it holds the lease in its own transaction
        granted = await jobs.grant_next_waiting(conn, slug, lease_secret_hash(new_lease_secret()))
    assert granted is not None
    return granted


async def _claim_run(
    db: Database, services: TxServices, slug: str, claimers: int, seconds: float
) -> Samples:
    """Claimers, each with a live lease of its own, claim and settle back to back until the
    deadline (a seed settled due at once may go to the same lease again: its hold row then tells
    the latest hold)."""
    samples = Samples()
    leases = [await _lease(db, slug) for _ in range(claimers)]
    deadline = time.perf_counter() + seconds

    async def claimer(job: Row) -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            async with db.transaction() as conn:
                tx = Tx(conn, services)
                granted = await seeding.hand_out(
                    tx,
                    job_id=job["id"],
                    lease_token=job["lease_token"],
                    secret_hash=job["lease_secret_hash"],
                    limit=CLAIM_SIZE,
                )
                await tx.flush()
            claimed = time.perf_counter()
            assert granted, f"{job['id']} got no seeds"
            results = [SeedResult(seed_id=s.id, ok=True, next_due_seconds=0) for s in granted]
            async with db.transaction() as conn:
                tx = Tx(conn, services)
                await seeding.settle(tx, job, results=results, release_reason="bench")
                await tx.flush()
            samples.claims.append(claimed - began)
            samples.settles.append(time.perf_counter() - claimed)

    started = time.perf_counter()
    await asyncio.gather(*(claimer(job) for job in leases))
    samples.seconds = time.perf_counter() - started
    return samples


def _row(samples: Samples) -> list[str]:
    cuts = statistics.quantiles(samples.claims, n=100, method="inclusive")
    settle = statistics.median(samples.settles)
    return [
        str(len(samples.claims)),
        f"{len(samples.claims) / samples.seconds:,.0f}",
        f"{cuts[49] * 1000:.2f}",
        f"{cuts[98] * 1000:.2f}",
        f"{settle * 1000:.2f}",
    ]


async def _import_run(db: Database, rows: int) -> None:
    """``rows`` CSV lines through the import path of `qm seeds import`, timed end to end."""
    async with db.transaction() as conn:
        await sites.add_site(conn, slug="imported", host="imported.example.com", capacity=1)
    lines = [f"https://imported.example.com/board/{n},{600 + n % 7},{n % 3}\n" for n in range(rows)]
    started = time.perf_counter()
    async with db.transaction() as conn:
        parsed = parse_rows(lines, "csv", interval_seconds=3600, priority=0)
        summary = await seeding.import_rows(conn, "imported", parsed)
    took = time.perf_counter() - started
    console.print(
        f"import of {rows:,} seeds (parse, COPY, upsert, commit): {took:.2f} s, "
        f"{rows / took:,.0f} seeds/s ({summary.added:,} added, {len(summary.refused)} refused)"
    )
