"""Everything runs over the secured transport: the collector principal's full SDK cycle against
the real processes (SASL_SSL with ACLs as ``quartermaster``, PostgreSQL over TLS only)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.kafka_acls import COLLECTOR
from app.settings import Settings
from tests.secured.conftest import SecuredStack, as_principal
from tests.support.leasing import CANARY, make_site, scalar
from tests.support.processes import QmProcess


async def tls_connections(engine: AsyncEngine) -> tuple[int, int]:
    """(connections to this database over TLS, without) — of every process, not just ours."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)"
                    " FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
                    " WHERE a.datname = current_database() AND a.client_port IS NOT NULL"
                )
            )
        ).one()
    return int(row[0]), int(row[1])


async def test_secured_collector_leases_heartbeats_and_finishes_through_the_sdk(
    topics: Settings, engine: AsyncEngine, secured_stack: SecuredStack
) -> None:
    settings = topics
    await make_site(engine, settings, capacity=1, n_accounts=1, lease_seconds=30)
    collector = as_principal(settings, secured_stack, COLLECTOR)
    with QmProcess(settings, "all") as server:
        async with (
            sdk_client(collector, collector="secured-collector") as client,
            client.job(site="board", wait_seconds=60, timeout=60) as job,
        ):
            assert job.account is not None
            assert job.account.secret.get_secret_value() == f"{CANARY}-0"
            await job.heartbeat()
            with_tls, without = await tls_connections(engine)
            assert with_tls >= 2 and without == 0  # the processes' pools and ours, all TLS
        assert server.proc is not None and server.proc.poll() is None, server.output()[-3000:]
        output = server.output()
    assert await scalar(engine, "SELECT status::text FROM jobs") == "SUCCEEDED"
    # the processes never print a password they were given
    for password in secured_stack.security.users.values():
        assert password not in output
    assert CANARY not in output
