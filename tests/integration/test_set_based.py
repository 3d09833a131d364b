"""The set path of the claim worker's shared transactions, on the real database: a batch of
heartbeats, finishes and starts, good ones mixed with refused ones (stale token, wrong secret,
unknown job, over the cap, a job that exists, a site unknown), gets exactly the replies, events and
states the same requests get one transaction each; and the batch does go the set path."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from app.db.engine import make_engine
from app.sealing import public_key_text
from app.settings import Settings
from app.store import Database
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import (
    cancel,
    held_lease,
    make_site,
    make_unreadable_site,
    replies,
    request,
    scalar,
    start,
)
from tests.support.statements import Statements
from workers.consuming import Incoming
from workers.requests import RequestProcessor

# what a reply or an event says that does not depend on when or in which run it was sent
KEPT = ("type", "reason", "status", "position", "error")
OVER_CAP = 2 * 24 * 3600  # within the schema, over QM_MAX_LEASE_SECONDS (a day)


def job(prefix: str, name: str) -> str:
    return f"{prefix}-{name}"


async def by_job(engine: AsyncEngine, topic: str, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """The messages of ``topic`` about the run's jobs, in order, each job by its name."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT key, payload FROM outbox WHERE topic = :topic ORDER BY id"),
            {"topic": topic},
        )
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for key, payload in rows:
            name = (key or b"").decode()
            if name.startswith(f"{prefix}-"):
                body = json.loads(bytes(payload))
                kept = {k: str(v).replace(prefix, "P") for k, v in body.items() if k in KEPT}
                found[name.removeprefix(f"{prefix}-")].append(kept)
    return dict(found)


async def states(engine: AsyncEngine, prefix: str) -> dict[str, Any]:
    """The run's jobs (status, reason, attempts), accounts (status, blocks) and sites (running)."""
    async with engine.connect() as conn:
        jobs = await conn.execute(
            text("SELECT id, status, reason, attempts FROM jobs WHERE id LIKE :p ORDER BY id"),
            {"p": f"{prefix}-%"},
        )
        accounts = await conn.execute(
            text(
                "SELECT username, status, consecutive_blocks, holder_job_id FROM accounts"
                " WHERE site LIKE :p ORDER BY username"
            ),
            {"p": f"{prefix}-%"},
        )
        sites = await conn.execute(
            text("SELECT slug, running FROM sites WHERE slug LIKE :p ORDER BY slug"),
            {"p": f"{prefix}-%"},
        )
        return {
            "jobs": [(r[0].removeprefix(prefix), str(r[1]), r[2], r[3]) for r in jobs],
            "accounts": [
                (r[0].replace(prefix, "P"), str(r[1]), r[2], (r[3] or "").replace(prefix, "P"))
                for r in accounts
            ],
            "sites": [(r[0].removeprefix(prefix), r[1]) for r in sites],
        }


async def scenario(
    engine: AsyncEngine, settings: Settings, prefix: str, batch: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """Heartbeats, then finishes, then starts, each kind sent together to a worker sharing a
    transaction among ``batch`` requests; what the run left behind, and the statements its
    batches sent (by first words)."""
    p = lambda name: job(prefix, name)  # noqa: E731 - a job id of this run
    site_a, site_b, site_c = p("a"), p("b"), p("c")
    await make_site(engine, settings, site_a, capacity=3, n_accounts=3)
    await make_site(engine, settings, site_b, capacity=1, n_accounts=1)
    await make_site(engine, settings, site_c, capacity=2, n_accounts=1)
    own = make_engine(settings, pool_size=2, pre_ping=False)
    statements = Statements(own)
    alone = RequestProcessor(settings.model_copy(update={"worker_batch_max": 1}), Database(own))
    worker = RequestProcessor(
        settings.model_copy(update={"worker_batch_max": batch, "worker_transactions": 1}),
        Database(own),
    )
    needs = {"account": True}
    # set-up, one request at a time: 6 has finished, 1-3 run on a, 4 runs on b with 5 waiting
    assert await alone.process(start(settings, p("6"), site=site_a, needs=needs)) == "replied"
    leases = {"6": await held_lease(engine, settings, p("6"))}
    finish6 = request(settings, "job.finish", p("6"), **leases["6"], outcome="succeeded")
    assert await alone.process(finish6) == "replied"
    for name, site in (("1", site_a), ("2", site_a), ("3", site_a), ("4", site_b), ("5", site_b)):
        assert await alone.process(start(settings, p(name), site=site, needs=needs)) == "replied"
    leases |= {n: await held_lease(engine, settings, p(n)) for n in ("1", "2", "3", "4")}
    # c's one account is held: a start there that needs one cannot be granted
    assert await alone.process(start(settings, p("20"), site=site_c, needs=needs)) == "replied"
    stale = {**leases["3"], "lease_token": leases["3"]["lease_token"] + 1000}
    wrong = {**leases["3"], "lease_secret": leases["1"]["lease_secret"]}

    async def send(records: list[Incoming]) -> None:
        outcomes = await asyncio.gather(*(worker.process(r) for r in records))
        assert outcomes == ["replied"] * len(records)

    counted: dict[str, int] = {}
    with statements.counting() as counts:
        await send(
            [
                request(settings, "job.heartbeat", p("1"), **leases["1"]),
                request(settings, "job.heartbeat", p("2"), **leases["2"], extend_seconds=120),
                request(settings, "job.heartbeat", p("3"), **stale),
                request(settings, "job.heartbeat", p("4"), **leases["4"], extend_seconds=60),
                request(settings, "job.heartbeat", p("none"), **leases["1"]),
                request(settings, "job.heartbeat", p("5"), **leases["1"]),
                request(settings, "job.heartbeat", p("6"), **leases["6"], extend_seconds=OVER_CAP),
            ]
        )
        await send(
            [
                request(settings, "job.finish", p("1"), **leases["1"], outcome="succeeded"),
                request(
                    settings, "job.finish", p("2"), **leases["2"], outcome="blocked", reason="x"
                ),
                request(settings, "job.finish", p("3"), **wrong, outcome="failed"),
                # frees b's slot: 5, waiting there, is granted
                request(settings, "job.finish", p("4"), **leases["4"], outcome="failed"),
                request(settings, "job.finish", p("none"), **leases["1"], outcome="succeeded"),
                request(settings, "job.finish", p("6"), **leases["6"], outcome="succeeded"),
            ]
        )
        await send(
            [
                start(settings, p("10"), site=site_a, needs=needs),  # a's last rested account
                start(settings, p("11"), site=site_a, needs=needs),  # waits for an account
                start(settings, p("12"), site=site_a),  # behind 11 (FIFO)
                start(settings, p("13"), site=site_b, needs=needs),  # waits for capacity
                start(settings, p("14"), site=p("nowhere")),
                start(settings, p("6"), site=site_a),  # the job exists
                start(settings, p("15"), site=site_a, lease_seconds=OVER_CAP),
                start(settings, p("16"), site=site_b, wait_seconds=0),  # cannot wait
                start(settings, p("17"), site=site_b, needs=needs),  # behind 13
                # 21 heads c's line and cannot wait: once it leaves, 22 behind it is granted
                start(settings, p("21"), site=site_c, needs=needs, wait_seconds=0),
                start(settings, p("22"), site=site_c, needs={"account": False}),
            ]
        )
        counted.update(counts)
    await own.dispose()
    left = {
        "replies": await by_job(engine, settings.topic("replies"), prefix),
        "events": await by_job(engine, settings.topic("events"), prefix),
        "states": await states(engine, prefix),
    }
    return left, counted


async def test_a_mixed_batch_gets_the_replies_events_and_states_of_one_request_at_a_time(
    engine: AsyncEngine, settings: Settings
) -> None:
    alone, counted_alone = await scenario(engine, settings, "one", batch=1)
    shared, counted_shared = await scenario(engine, settings, "set", batch=32)
    assert shared["replies"] == alone["replies"]
    assert shared["events"] == alone["events"]
    assert shared["states"] == alone["states"]
    # what was compared: refusals of every kind, grants and the line's order
    replies = alone["replies"]
    assert [r["reason"] for r in replies["3"][-2:]] == ["stale_token", "wrong_secret"]
    assert [r["type"] for r in replies["5"]] == ["job.queued", "job.lease_lost", "job.granted"]
    assert replies["none"] == [{"type": "job.lease_lost", "reason": "unknown_job"}] * 2
    assert [r.get("position") for r in replies["12"]] == ["2"]
    assert replies["14"] == [{"type": "job.rejected", "reason": "unknown_site"}]
    assert replies["16"] == [{"type": "job.rejected", "reason": "no_capacity"}]
    assert replies["21"] == [{"type": "job.rejected", "reason": "no_capacity"}]
    assert [r["type"] for r in replies["22"]] == ["job.granted"]
    assert replies["6"][-1] == {"type": "job.rejected", "reason": "job_exists"}
    assert replies["15"][0]["type"] == "request.invalid"
    # and the shared run went the set path: one statement per kind, not one per request
    assert counted_shared["WITH heartbeats AS"] == 1
    assert counted_shared["WITH finishes AS"] == 1
    assert counted_shared["WITH releases AS"] == 1
    assert counted_shared["INSERT INTO jobs"] == 1
    assert "WITH heartbeats AS" not in counted_alone


async def invariants(engine: AsyncEngine) -> None:
    """No double lease: each site runs what its running jobs say and no more than its capacity,
    each account in use is held by one running job, each running job's grant is open."""
    async with engine.connect() as conn:
        over = await conn.execute(
            text(
                """
                SELECT s.slug FROM sites s
                WHERE s.running > s.capacity OR s.running <> (
                    SELECT count(*) FROM jobs j WHERE j.site = s.slug AND j.status = 'RUNNING')
                """
            )
        )
        assert over.all() == []
        shared = await conn.execute(
            text(
                """
                SELECT account_id FROM jobs WHERE status = 'RUNNING' AND account_id IS NOT NULL
                GROUP BY account_id HAVING count(*) > 1
                UNION ALL
                SELECT a.id FROM accounts a LEFT JOIN jobs j ON j.id = a.holder_job_id
                WHERE (a.status = 'USING') <> (j.status IS NOT DISTINCT FROM 'RUNNING'
                                              AND j.account_id = a.id)
                """
            )
        )
        assert shared.all() == []
        grants = await conn.execute(
            text(
                """
                SELECT (SELECT count(*) FROM job_grants WHERE ended_at IS NULL),
                       (SELECT count(*) FROM jobs WHERE status = 'RUNNING')
                """
            )
        )
        open_grants, running = grants.one()
        assert open_grants == running


async def test_shared_transactions_finishing_and_starting_on_the_same_sites_at_once(
    engine: AsyncEngine, settings: Settings
) -> None:
    slugs = ("r0", "r1", "r2")
    for slug in slugs:
        await make_site(engine, settings, slug, capacity=2, n_accounts=2)
    own = make_engine(settings, pool_size=4, pre_ping=False)
    statements = Statements(own)
    knobs = {"worker_batch_max": 8, "worker_transactions": 2}
    workers = [RequestProcessor(settings.model_copy(update=knobs), Database(own)) for _ in range(2)]
    needs = {"account": True}
    finished: set[str] = set()
    with capture_logs() as logs, statements.counting() as counts:
        for round_ in range(6):  # bounded: six rounds of 12 starts and the finishes of the last
            running = [job_id for job_id in await running_job_ids(engine) if job_id not in finished]
            leases = {j: await held_lease(engine, settings, j) for j in running}
            records = [
                request(settings, "job.finish", j, **leases[j], outcome="succeeded")
                for j in running
            ] + [
                start(settings, f"r{round_}-{n}", site=slugs[n % 3], needs=needs) for n in range(12)
            ]
            finished.update(running)
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(workers[n % 2].process(r) for n, r in enumerate(records))),
                timeout=60,  # a deadlock would hold both transactions: none may happen
            )
            assert outcomes == ["replied"] * len(records)
            await invariants(engine)
    await own.dispose()
    # every shared transaction committed: none failed (a deadlock) and went again alone
    assert [e for e in logs if e["event"] == "shared_transaction_failed"] == []
    assert len(finished) >= 6 * 2  # the rounds did grant and finish jobs on every pass
    # and they went the set path: a statement for many finishes, for many starts
    assert counts["WITH finishes AS"] > 0 and counts["WITH releases AS"] > 0
    assert 0 < counts["INSERT INTO jobs"] < 6 * 12


async def running_job_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id FROM jobs WHERE status = 'RUNNING' ORDER BY id"))
        return [job_id for (job_id,) in rows]


async def test_starts_after_a_grant_that_retires_the_sites_last_account_are_answered_as_alone(
    engine: AsyncEngine, settings: Settings
) -> None:
    answers = {}
    for batch in (1, 32):
        slug = f"locked{batch}"
        await make_unreadable_site(engine, settings, slug)  # its one account opens with no key
        worker = RequestProcessor(
            settings.model_copy(update={"worker_batch_max": batch, "worker_transactions": 1}),
            Database(engine),
        )
        records = [start(settings, f"{slug}-{n}", site=slug) for n in range(3)]
        outcomes = await asyncio.gather(*(worker.process(r) for r in records))
        assert outcomes == ["replied"] * 3
        found = await by_job(engine, settings.topic("replies"), slug)
        answers[batch] = [found[str(n)] for n in range(3)]
    # the first grant retires the account: the starts read after it find no account at all
    assert answers[1] == [
        [{"type": "job.rejected", "reason": "account_unreadable"}],
        [{"type": "job.rejected", "reason": "no_accounts"}],
        [{"type": "job.rejected", "reason": "no_accounts"}],
    ]
    assert answers[32] == answers[1]


def shared_processor(settings: Settings, engine: AsyncEngine) -> RequestProcessor:
    """One worker transaction at a time, taking up to 32 requests: records handed over together
    share it."""
    shared = {"worker_batch_max": 32, "worker_transactions": 1}
    return RequestProcessor(settings.model_copy(update=shared), Database(engine))


async def test_a_lone_finish_read_before_starts_on_its_site_hands_its_slot_on_in_read_order(
    engine: AsyncEngine, settings: Settings, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, capacity=1, n_accounts=3)
    await processor.process(start(settings, "j0"))
    lease = await held_lease(engine, settings, "j0")
    shared = shared_processor(settings, engine)

    await asyncio.gather(
        shared.process(request(settings, "job.finish", "j0", **lease, outcome="succeeded")),
        shared.process(start(settings, "x")),
        shared.process(start(settings, "y")),
    )

    # read order: the finish frees the slot, x takes it, y waits behind it; x never hears queued
    assert [r["type"] for r in await replies(engine, settings, "x")] == ["job.granted"]
    assert [(r["type"], r.get("position")) for r in await replies(engine, settings, "y")] == [
        ("job.queued", 1)
    ]
    kept = await scalar(engine, "SELECT reply->>'type' FROM inbox WHERE job_id = 'x'")
    assert kept == "job.granted"  # a redelivered start of x gets its grant


async def test_a_cancel_of_a_waiting_job_read_before_finishes_on_its_site_cancels_it(
    engine: AsyncEngine, settings: Settings, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, capacity=2, n_accounts=3)
    for name in ("a", "b", "w"):
        await processor.process(start(settings, name))
    leases = {name: await held_lease(engine, settings, name) for name in ("a", "b")}
    shared = shared_processor(settings, engine)

    await asyncio.gather(
        shared.process(cancel(settings, "w")),
        *(
            shared.process(
                request(settings, "job.finish", name, **leases[name], outcome="succeeded")
            )
            for name in ("a", "b")
        ),
    )

    assert [r["type"] for r in await replies(engine, settings, "w")] == [
        "job.queued", "job.rejected", "job.cancelled"
    ]  # fmt: skip
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'w'") == "CANCELLED"


async def test_the_set_path_keeps_every_predicate_of_a_heartbeat_and_of_a_start_again(
    engine: AsyncEngine, settings: Settings, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, capacity=4, n_accounts=4, lease_seconds=60)
    for name in ("a", "b", "c", "e"):
        await processor.process(start(settings, name))
    leases = {name: await held_lease(engine, settings, name) for name in ("a", "b", "c", "e")}
    lapse = "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"
    async with engine.begin() as conn:  # e's lease lapsed and was reaped: EXPIRED, startable again
        await conn.execute(text(lapse), {"id": "e"})
    await ExpiredLeases(settings, Database(engine)).run_once()
    async with engine.begin() as conn:  # c's lapsed and was not reaped yet
        await conn.execute(text(lapse), {"id": "c"})
    other_key = public_key_text(X25519PrivateKey.generate())
    wrong_secret = {**leases["b"], "lease_secret": leases["a"]["lease_secret"]}
    own = make_engine(settings, pool_size=1, pre_ping=False)  # counted from its first connection
    statements = Statements(own)
    shared = shared_processor(settings, own)

    try:
        with statements.counting() as counts:
            await asyncio.gather(
                shared.process(request(settings, "job.heartbeat", "a", **leases["a"])),
                shared.process(request(settings, "job.heartbeat", "b", **wrong_secret)),
                shared.process(request(settings, "job.heartbeat", "c", **leases["c"])),
                shared.process(start(settings, "e", public_key=other_key)),  # another's restart
                shared.process(start(settings, "f")),
            )
    finally:
        await own.dispose()

    assert counts["WITH heartbeats AS"] == 1 and counts["INSERT INTO jobs"] == 1  # the set path
    last = {n: (await replies(engine, settings, n))[-1] for n in ("a", "b", "c", "e", "f")}
    assert last["a"]["type"] == "job.extended"
    assert (last["b"]["type"], last["b"]["reason"]) == ("job.lease_lost", "wrong_secret")
    assert (last["c"]["type"], last["c"]["reason"]) == ("job.lease_lost", "lease_expired")
    assert (last["e"]["type"], last["e"]["reason"]) == ("job.rejected", "not_yours")
    assert last["f"]["type"] == "job.granted"
    assert await scalar(engine, "SELECT status::text FROM jobs WHERE id = 'e'") == "EXPIRED"
    lapsed = "SELECT lease_expires_at < now() FROM jobs WHERE id = :id"
    assert await scalar(engine, lapsed, id="c") is True  # not extended
    assert await scalar(engine, lapsed, id="b") is False
