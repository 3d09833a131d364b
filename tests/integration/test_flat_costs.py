"""Plans that do not grow with history: on a database with finished jobs and many accounts
preloaded and analyzed while no job ran (the statistics a fresh deployment has), the leasing path
finds running jobs by primary key and held accounts by their holder, and the site lock's
"has accounts" check reads one index entry; a seed claim reads the due seeds alone past a level
of settled ones, and a capture handoff finds its captures by key past delivered ones."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.settings import Settings
from app.store import Database, captures, outbox, seeds
from app.store import bench_history as history
from app.store.sites import _LOCK_SITE
from tests.support.captures import running_job, submit
from tests.support.leasing import make_site, replies, scalar, start
from workers.requests import RequestProcessor

HISTORY_JOBS = 20_000
ACCOUNTS_PER_SITE = 3_000


async def plan(engine: AsyncEngine, sql: str, **params: Any) -> str:
    async with engine.connect() as conn:
        rows = await conn.execute(text(f"EXPLAIN {sql}"), params)
        return "\n".join(str(r[0]) for r in rows)


async def preload(engine: AsyncEngine, settings: Settings, *, captures: bool = False) -> None:
    await make_site(engine, settings, "other", capacity=1)
    await make_site(engine, settings, "board", capacity=20, n_accounts=20)
    async with engine.begin() as conn:
        for site in ("other", "board"):  # board's accounts come after all of other's
            await history.add_accounts(conn, site, ACCOUNTS_PER_SITE, b"unused")
        await history.add_finished_jobs(
            conn, ["other", "board"], first=1, last=HISTORY_JOBS, total=HISTORY_JOBS, span=3600.0,
            captures=captures,
        )  # fmt: skip
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await history.vacuum_analyze(conn)


async def test_the_leasing_path_uses_the_key_and_the_holder_index_whatever_the_statistics(
    settings: Settings, engine: AsyncEngine
) -> None:
    await preload(engine, settings)
    processor = RequestProcessor(settings, Database(engine))
    for n in range(10):  # running jobs the statistics have not seen
        await processor.process(start(settings, f"live-{n}"))
    [grant] = [r for r in await replies(engine, settings, "live-3") if r["type"] == "job.granted"]
    token = grant["lease_token"]

    job_step = await plan(
        engine,
        "UPDATE jobs SET updated_at = now() WHERE id = :id AND status = 'RUNNING'"
        " AND lease_token = :token AND lease_expires_at > clock_timestamp()",
        id="live-3",
        token=token,
    )
    assert "jobs_pkey" in job_step and "jobs_lease_expiry" not in job_step
    account_step = await plan(
        engine,
        "UPDATE accounts SET lease_expires_at = now() WHERE holder_job_id = :id"
        " AND lease_token = :token",
        id="live-3",
        token=token,
    )
    assert "accounts_holder" in account_step
    lock = await plan(engine, _LOCK_SITE.format(which="s.slug = :slug"), slug="board")
    assert "accounts_grantable" in lock and "Seq Scan on accounts" not in lock, lock


async def test_the_expired_leases_sweep_still_reads_the_expiry_index(
    settings: Settings, engine: AsyncEngine
) -> None:
    await preload(engine, settings)
    sweep = await plan(
        engine,
        "SELECT id, site, lease_token FROM jobs WHERE status = 'RUNNING'"
        " AND lease_expires_at < now() AND id > '' AND granted_at IS NOT NULL"
        " ORDER BY id LIMIT 100",
    )
    assert "jobs_lease_expiry" in sweep


@pytest.mark.parametrize("analyzed", ["empty", "full"])
async def test_the_relays_read_of_the_outbox_walks_its_index_past_deleted_rows(
    engine: AsyncEngine, analyzed: str
) -> None:
    # a busy outbox: rows published and deleted faster than autovacuum comes (once a minute at
    # most), analyzed while it was empty or while it held them
    if analyzed == "empty":
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE outbox"))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox (shard, topic, key, headers, payload)"
                " SELECT n % 16, 'replies', NULL, '[]', '{}' FROM generate_series(1, 20000) AS n"
            )
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        if analyzed == "full":
            await conn.execute(text("ANALYZE outbox"))
        await conn.execute(text("DELETE FROM outbox WHERE id % 20 <> 0"))
        await outbox.prepare_relay_session(conn)
        explained = await conn.execute(
            text(f"EXPLAIN {outbox._FETCH_UNSENT.text}"),
            # with rows of rounds in flight to pass over, as a pipelined relay reads
            {"shards": list(range(16)), "limit": 500, "skip_topics": [], "busy": [20, 40, 60]},
        )
        fetch = "\n".join(str(r[0]) for r in explained)
    # an index scan marks the dead entries it passes, so the next read skips them; a bitmap
    # scan visits every dead row again on every read until a vacuum
    assert "Index Scan using outbox_" in fetch and "Bitmap" not in fetch, fetch


SETTLED_SEEDS = 100_000  # a fifth of them on the top priority level, none due


async def explain_analyzed(conn: AsyncConnection, sql: str, params: dict[str, Any]) -> list[Any]:
    """The plan nodes of ``sql`` as run (EXPLAIN ANALYZE, BUFFERS), depth first."""
    result = await conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params)
    nodes, todo = [], [result.scalar_one()[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    return nodes


async def test_a_seed_claim_reads_only_due_seeds_past_a_level_of_settled_ones(
    settings: Settings, engine: AsyncEngine
) -> None:
    # a site whose highest priority level is all done and not due yet: the claim's walk of
    # seeds_due in claim order must jump to the due seeds, not read every settled one first
    await make_site(engine, settings, "board", capacity=5, n_accounts=5)
    async with engine.begin() as conn:
        await history.add_rewrites(conn, ["board"])
        await history.add_settled_seeds(
            conn, ["board"], first=1, last=SETTLED_SEEDS, seeds=SETTLED_SEEDS, jobs=0, span=3600.0
        )
        await seeds.generate_seeds(conn, "board", 200, priorities=history.SEED_PRIORITIES - 1)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await history.vacuum_analyze(conn)
    processor = RequestProcessor(settings, Database(engine))
    await processor.process(start(settings, "claimer", needs={"account": False, "seeds": 5}))
    token, secret_hash = (
        await scalar(engine, "SELECT ARRAY[lease_token::text, encode(lease_secret_hash, 'hex')]"
                     " FROM jobs WHERE id = 'claimer'")
    )  # fmt: skip
    params = {"job_id": "claimer", "token": int(token), "limit": 5, "now": None,
              "secret_hash": bytes.fromhex(secret_hash)}  # fmt: skip
    async with engine.begin() as conn:
        nodes = await explain_analyzed(conn, seeds._CLAIM.text, params)
        await conn.rollback()
    [scan] = [n for n in nodes if n.get("Index Name") == "seeds_due"]
    assert scan["Actual Rows"] == 5, scan
    read = scan["Shared Hit Blocks"] + scan["Shared Read Blocks"]
    assert read < 20, f"the claim read {read} blocks of seeds_due"


async def test_a_capture_handoff_finds_its_captures_past_delivered_history(
    settings: Settings, engine: AsyncEngine
) -> None:
    await preload(engine, settings, captures=True)
    processor = RequestProcessor(settings, Database(engine))
    lease = await running_job(processor, engine, settings, "capturer")
    assert await processor.process(submit(settings, "capturer", lease, "cap-new")) == "replied"
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE captures"))  # one RECEIVED among 20,000 delivered
    claim = await plan(
        engine,
        "SELECT id FROM captures WHERE id = ANY(CAST(:ids AS text[])) AND status = 'RECEIVED'"
        " AND next_attempt_at <= now() ORDER BY id FOR UPDATE",
        ids=["cap-new"],
    )
    assert "Seq Scan" not in claim, claim
    finish = await plan(
        engine,
        "UPDATE captures c SET status = 'HANDED_OFF' FROM unnest(CAST(:ids AS text[]),"
        " CAST(:tokens AS bigint[])) AS f(id, token) WHERE c.id = f.id"
        " AND c.status = 'HANDING_OFF' AND c.handoff_token = f.token",
        ids=["cap-new"],
        tokens=[1],
    )
    assert "Seq Scan on captures" not in finish, finish


async def test_a_handoff_claim_by_id_reads_its_captures_alone_past_an_unseen_backlog(
    settings: Settings, engine: AsyncEngine
) -> None:
    # statistics taken over delivered history (RECEIVED captures rare), then a backlog of due
    # captures they have not seen (autoanalyze waits for a tenth of the table to change): a
    # claim of a batch by id must look its captures up by key, not walk captures_due (every
    # due capture) filtering on id
    await preload(engine, settings, captures=True)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO captures (id, job_id, site, url, storage_uri, sha256, content_type,"
                " size, captured_at, next_attempt_at)"
                " SELECT 'backlog-' || g, 'history-2', 'board', 'https://board.example.com/' || g,"
                " 's3://b/' || g, md5(g::text) || md5(g::text), 'text/html', 1, now(),"
                " now() - interval '1 minute' FROM generate_series(1, 5000) AS g"
            )
        )
    claim = await plan(
        engine,
        captures._CLAIM_HANDOFFS.text,
        ids=["backlog-7", "backlog-4242"],
        holder="h",
        lease=5.0,
        now=None,
    )
    assert "captures_due" not in claim and "captures_pkey" in claim, claim
