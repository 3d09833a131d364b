"""Where a benchmark runs: a real broker and a freshly migrated database, started here unless the
environment (KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL) names them. Shared by every `qm bench`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from app.db.engine import connect_args
from app.db.migrate import upgrade
from app.devstack import ServiceUnavailable
from app.devstack.kafka import KafkaBroker, wait_for_metadata
from app.devstack.postgres import EmbeddedPostgres
from app.kafka import client_options
from app.settings import get_settings


@dataclass(frozen=True, slots=True)
class BenchServices:
    """Where the services are; the pids of those started here (their CPU is reported)."""

    bootstrap: str
    database_url: str
    durability: str
    pids: dict[str, int]
    admin_url: str = ""

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """Another freshly migrated database on the same server: a repeated run's own, so no run
        inherits an earlier one's rows (or their vacuuming)."""
        with _database(self.admin_url) as (url, _):
            yield url


@contextlib.contextmanager
def services(*, kafka: bool = True) -> Iterator[BenchServices]:
    """A broker and a freshly migrated database, started here unless the environment names them
    (``kafka=False``: no broker, for benchmarks of the database alone)."""
    with contextlib.ExitStack() as stack:
        pids: dict[str, int] = {}
        settings = get_settings()  # how to connect: QM_KAFKA_SECURITY_PROTOCOL, QM_DATABASE_SSL ...
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        if not kafka:
            pass
        elif bootstrap:
            security = {
                k: v for k, v in client_options(settings).items() if k != "bootstrap_servers"
            }
            asyncio.run(wait_for_metadata(bootstrap, 15, security))
        else:
            broker = stack.enter_context(KafkaBroker())
            bootstrap, pids["kafka"] = broker.bootstrap, broker.process.pid if broker.process else 0
        admin_url = os.environ.get("DATABASE_URL")
        if not admin_url:
            postgres = stack.enter_context(EmbeddedPostgres(fast=False))
            admin_url = postgres.url()
            pid_file = Path(postgres.socket_dir) / "postmaster.pid"
            pids["postgres"] = int(read_text(pid_file).split("\n", 1)[0] or 0)
        with _database(admin_url) as (url, durability):
            yield BenchServices(bootstrap, url, durability, pids, admin_url)


@contextlib.contextmanager
def _database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A freshly migrated database on the server of ``admin_url``, dropped at the end; its URL
    and the server's durability settings."""
    tls = connect_args(get_settings())
    name = f"qm_bench_{uuid.uuid4().hex[:8]}"
    durability = asyncio.run(_admin(admin_url, f"CREATE DATABASE {name}", tls))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url, connect_args=tls)
        yield url, durability
    finally:
        asyncio.run(_admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", tls))


def run_database(services: BenchServices, run: int) -> contextlib.AbstractContextManager[str]:
    """The database of a repeated benchmark's ``run``: the first run's is the one ``services``
    made, each later run gets a fresh one."""
    return contextlib.nullcontext(services.database_url) if run == 0 else services.fresh_database()


def bench_names() -> dict[str, Any]:
    """A benchmark run's own topics and consumer groups, named under the configured ones, so a
    broker's ACLs for the service (prefixed: docs/security.md) cover them."""
    base, run = get_settings(), f"bench{uuid.uuid4().hex[:8]}"
    return {
        "topic_prefix": f"{base.topic_prefix}{run}.",
        "consumer_group": f"{base.consumer_group}.{run}",
        "handoff_consumer_group": f"{base.handoff_consumer_group}.{run}",
        "alert_consumer_group": f"{base.alert_consumer_group}.{run}",
    }


async def _admin(url: str, statement: str, tls: dict[str, Any]) -> str:
    """Run ``statement``; return the server's durability settings."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = await asyncpg.connect(dsn, timeout=15, **tls)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ServiceUnavailable(f"PostgreSQL cannot be reached at DATABASE_URL: {exc}") from exc
    try:
        await conn.execute(statement)
        names = ("fsync", "synchronous_commit", "full_page_writes")
        return " ".join([f"{n}={await conn.fetchval(f'SHOW {n}')}" for n in names])
    finally:
        await conn.close()


def read_text(path: str | Path) -> str:
    """A file's text, or "" when it cannot be read (a process that just exited)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""
