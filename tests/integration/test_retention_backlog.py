"""Retention of a backlog larger than a batch, on the real database: the job reaper's retention
sweeps delete old jobs with their grants and delivered captures, ended seed holds, and old inbox
rows, each sweep a bounded number of bounded batches, so the backlog drains over several rounds;
recent history, and a job whose capture failed, stay."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from app.store import bench_history as history
from reapers.inbox_retention import InboxRetention
from reapers.job_retention import JobRetention
from tests.support.leasing import make_site, scalar

OLD, RECENT = 100, 20  # history jobs 1..OLD are past retention, the next RECENT are not
SEEDS = 100  # settled seeds; seed k was done by jobs k and k + SEEDS
BATCH, BATCHES = 20, 2  # rows a statement, statements a sweep


async def load_backlog(engine: AsyncEngine, settings: Settings) -> None:
    """OLD + RECENT finished jobs (grant, inbox row, delivered capture each) and SEEDS settled
    seeds with their holds, the old jobs' rows moved back past retention; job 7's capture FAILED."""
    await make_site(engine, settings, "board", capacity=1)
    total, past = OLD + RECENT, settings.job_retention_seconds + 3600
    async with engine.begin() as conn:
        await history.add_rewrites(conn, ["board"])
        await history.add_finished_jobs(
            conn, ["board"], first=1, last=total, total=total, span=600.0, captures=True
        )
        await history.add_settled_seeds(
            conn, ["board"], first=1, last=SEEDS, seeds=SEEDS, jobs=total, span=600.0
        )
        old = [f"history-{n}" for n in range(1, OLD + 1)]
        for table, column, key in (
            ("jobs", "finished_at", "id"),
            ("captures", "handed_off_at", "job_id"),
            ("seed_assignments", "ended_at", "job_id"),
            ("inbox", "created_at", "job_id"),
        ):
            await conn.execute(
                text(
                    f"UPDATE {table} SET {column} = {column} - make_interval(secs => :past) "
                    f"WHERE {key} = ANY(:old)"
                ),
                {"past": past, "old": old},
            )
        await conn.execute(
            text(
                "UPDATE captures SET status = 'FAILED', failed_at = now(), last_error = 'gone' "
                "WHERE job_id = 'history-7'"
            )
        )


async def count(engine: AsyncEngine, sql: str) -> int:
    return int(await scalar(engine, sql))


async def test_a_backlog_drains_over_several_sweeps_each_bounded(
    engine: AsyncEngine, settings: Settings
) -> None:
    await load_backlog(engine, settings)
    small = settings.model_copy(update={"job_prune_batch": BATCH, "inbox_prune_batch": BATCH})
    jobs = JobRetention(small, Database(engine))
    jobs.max_batches, jobs.hold_pages = BATCHES, BATCHES
    old_holds = "SELECT count(*) FROM seed_assignments WHERE ended_at < now() - interval '1 day'"
    assert await count(engine, old_holds) == OLD

    drained: list[int] = []
    for _ in range(10):  # bounded: the backlog needs ceil(99 / 40) = 3 sweeps
        swept = await jobs.run_once()
        drained.append(len(swept.changed))
        if not swept.changed:
            break
    assert drained == [40, 40, 19, 0]  # never more than BATCHES x BATCH a sweep
    kept = await scalar(engine, "SELECT array_agg(id ORDER BY finished_at) FROM jobs")
    assert kept[0] == "history-7" and len(kept) == 1 + RECENT  # its capture FAILED
    assert await count(engine, "SELECT count(*) FROM captures") == 1 + RECENT
    assert await count(engine, "SELECT count(*) FROM job_grants") == 1 + RECENT
    # the holds: each sweep walked BATCHES pages of BATCH seeds, from where the last stopped
    assert await count(engine, old_holds) == 0
    assert await count(engine, "SELECT count(*) FROM seed_assignments") == RECENT
    assert await count(engine, "SELECT count(*) FROM seeds") == SEEDS

    inbox = InboxRetention(small, Database(engine))
    inbox.max_batches = BATCHES
    sizes = [len((await inbox.run_once()).changed) for _ in range(4)]
    assert sizes == [40, 40, 20, 0]
    assert await count(engine, "SELECT count(*) FROM inbox") == RECENT


async def test_the_seed_holds_walk_stops_after_its_pages_and_goes_on_next_sweep(
    engine: AsyncEngine, settings: Settings
) -> None:
    await load_backlog(engine, settings)
    small = settings.model_copy(update={"job_prune_batch": BATCH})
    sweep = JobRetention(small, Database(engine))
    sweep.max_batches, sweep.hold_pages = 0, BATCHES  # the holds alone
    remaining = []
    for _ in range(3):
        await sweep.run_once()
        remaining.append(await count(engine, "SELECT count(*) FROM seed_assignments"))
    # seeds 1..40, then 41..80, then 81..100 lose their old hold (one each)
    assert remaining == [OLD + RECENT - 40, OLD + RECENT - 80, RECENT]
    assert sweep.seed_cursor == 0  # past the last seed: the next pass starts over
