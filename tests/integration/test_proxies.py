"""Proxies pinned to accounts, against the real database: pinning in the grant, the K limit under
concurrent collectors, a site that requires a proxy, failures that rest and block a proxy and
move its accounts.

Every test runs with each request in a transaction of its own (real concurrent transactions) and
with requests sharing one transaction, as the claim worker's group commit does.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.leases import grant_site
from app.core.transaction import Tx
from app.crypto import SecretBox
from app.sealing import Unsealable, unseal
from app.settings import Settings
from app.store import Database
from app.store.proxies import add_proxy
from reapers.capacity_back import CapacityBack
from schemas.messages import seal_context
from tests.support.leasing import (
    COLLECTOR_KEY,
    db_now,
    lease_fields,
    make_site,
    replies,
    request,
    scalar,
    sealed_state,
    start,
)
from tests.support.proxies import (
    PROXY_PASSWORD,
    events,
    grant_history,
    make_proxies,
    proxy_url,
    set_site,
)
from workers.requests import RequestProcessor


@pytest.fixture(params=[1, 32], ids=["own-transactions", "shared-transactions"])
async def processor(
    request: pytest.FixtureRequest, settings: Settings, engine: AsyncEngine
) -> RequestProcessor:
    return RequestProcessor(
        settings.model_copy(update={"worker_batch_max": request.param}), Database(engine)
    )


async def answers(engine: AsyncEngine, settings: Settings, job_id: str) -> list[dict]:
    return await replies(engine, settings, job_id)


async def grant_of(engine: AsyncEngine, settings: Settings, job_id: str) -> dict:
    grants = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    assert len(grants) == 1, grants
    return grants[0]


async def finish(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    job_id: str,
    **fields: object,
) -> None:
    lease = lease_fields(await grant_of(engine, settings, job_id))
    fields.setdefault("outcome", "succeeded")
    await processor.process(request(settings, "job.finish", job_id, **lease, **fields))


async def test_proxy_is_pinned_on_the_first_grant_kept_after_and_sealed_to_the_collector(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    (account,) = await make_site(engine, settings)
    first, _ = await make_proxies(engine, settings, n=2)
    for n in range(3):  # one account, granted three times: always through the same proxy
        await processor.process(start(settings, f"job-{n}"))
        grant = await grant_of(engine, settings, f"job-{n}")
        assert grant["proxy"]["label"] == "http://10.0.0.1:3128"
        context = seal_context("proxy.url", f"job-{n}")
        assert unseal(COLLECTOR_KEY, grant["proxy"]["url"], context).decode() == proxy_url(1)
        with pytest.raises(Unsealable):  # another reader of the replies opens nothing
            unseal(X25519PrivateKey.generate(), grant["proxy"]["url"], context)
        assert PROXY_PASSWORD not in json.dumps(await replies(engine, settings))
        await finish(processor, engine, settings, f"job-{n}")
    assert [g["proxy_id"] for g in await grant_history(engine)] == [first] * 3
    assert await scalar(engine, "SELECT proxy_id FROM accounts WHERE id = :id", id=account) == first
    # at rest the URL is sealed: the password is in no column of the table
    assert await scalar(engine, "SELECT count(*) FROM proxies WHERE url_sealed::text LIKE :p",
                        p=f"%{PROXY_PASSWORD.encode().hex()}%") == 0  # fmt: skip


async def test_proxy_optional_site_without_a_free_proxy_grants_without_one(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=2, n_accounts=2)
    await make_proxies(engine, settings, n=1, max_accounts=1)
    for job_id in ("job-a", "job-b"):
        await processor.process(start(settings, job_id))
    grants = [await grant_of(engine, settings, j) for j in ("job-a", "job-b")]
    assert [g["proxy"] and g["proxy"]["label"] for g in grants] == ["http://10.0.0.1:3128", None]


async def test_proxy_many_collectors_at_once_never_pin_more_than_max_accounts_to_a_proxy(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=12, n_accounts=12)
    await set_site(engine, "board", proxy_required=True)
    proxy_ids = await make_proxies(engine, settings, n=3, max_accounts=2)
    # twelve collectors start at once: six places on proxies, so six grants, six wait
    await asyncio.gather(*(processor.process(start(settings, f"job-{n}")) for n in range(12)))
    kinds = Counter(r["type"] for r in await replies(engine, settings))
    assert kinds == {"job.granted": 6, "job.queued": 6}
    queued = [r for r in await replies(engine, settings) if r["type"] == "job.queued"]
    assert {r["reason"] for r in queued} == {"proxy"}
    history = await grant_history(engine)
    assert Counter(g["proxy_id"] for g in history) == dict.fromkeys(proxy_ids, 2)
    pinned = await scalar(
        engine,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM accounts WHERE proxy_id IS NOT NULL"
        " GROUP BY proxy_id) c",
    )
    assert pinned == 2  # counted on the accounts too: no proxy carries more than K
    # and every account keeps its proxy when the line moves on
    for g in history:
        await finish(processor, engine, settings, g["job_id"])
    later = (await grant_history(engine))[6:]
    assert len(later) == 6
    first_proxy = {g["account_id"]: g["proxy_id"] for g in history}
    assert all(first_proxy[g["account_id"]] == g["proxy_id"] for g in later)


async def test_proxy_required_site_grants_no_account_without_one_and_says_why(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await set_site(engine, "board", proxy_required=True)
    await processor.process(start(settings, "job-1"))
    [queued] = await answers(engine, settings, "job-1")
    assert (queued["type"], queued["reason"]) == ("job.queued", "proxy")
    assert await scalar(engine, "SELECT count(*) FROM job_grants") == 0
    assert await scalar(engine, "SELECT running FROM sites") == 0
    # a proxy added later lets the line through (the capacity-back sweep's grant)
    await make_proxies(engine, settings)
    async with engine.begin() as conn:
        tx = Tx(conn, processor.services)
        assert await grant_site(tx, "board") == ["job-1"]
        await tx.flush()
    assert (await grant_of(engine, settings, "job-1"))["proxy"]["label"] == "http://10.0.0.1:3128"


async def test_proxy_failure_rests_it_then_blocks_it_and_its_accounts_move_to_healthy_proxies(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=2, n_accounts=2)
    failing, healthy = await make_proxies(engine, settings, n=2, max_accounts=2, block_after=2)
    await processor.process(start(settings, "job-1"))  # account 1 pinned to the least loaded
    await processor.process(start(settings, "job-2"))  # account 2 to the other
    assert [g["proxy_id"] for g in await grant_history(engine)] == [failing, healthy]
    await finish(processor, engine, settings, "job-1", proxy_failed=True)
    assert await scalar(engine, "SELECT status::text FROM proxies WHERE id = :i", i=failing) == (
        "ACTIVE"
    )
    await processor.process(start(settings, "job-3"))
    await finish(processor, engine, settings, "job-3", outcome="failed", proxy_failed=True)
    status = await scalar(
        engine, "SELECT status::text || ' ' || blocked_reason FROM proxies WHERE id = :i", i=failing
    )
    assert status == "BLOCKED 2 failures in a row"
    # its account moved to the healthy proxy, with an event and nothing left on the blocked one
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id = :i", i=failing) == 0
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id = :i", i=healthy) == 2
    [moved] = await events(engine, settings, "account.repinned")
    assert "http://10.0.0.1:3128 blocked; now http://10.0.0.2:3128" in moved["reason"]
    assert [e["status"] for e in await events(engine, settings, "proxy.failed")] == ["ACTIVE"]
    assert len(await events(engine, settings, "proxy.blocked")) == 1
    await processor.process(start(settings, "job-4"))
    assert (await grant_of(engine, settings, "job-4"))["proxy"]["label"] == "http://10.0.0.2:3128"


async def test_proxy_resting_after_a_failure_holds_its_accounts_until_the_rest_ends(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await make_proxies(engine, settings, cooldown_seconds=600)
    await processor.process(start(settings, "job-1"))
    await finish(processor, engine, settings, "job-1", proxy_failed=True)
    await processor.process(start(settings, "job-2"))  # the account is rested, its proxy not
    [queued] = await answers(engine, settings, "job-2")
    assert (queued["type"], queued["reason"]) == ("job.queued", "proxy")
    rest = await scalar(engine, "SELECT available_at - now() FROM proxies")
    assert 590 <= rest.total_seconds() <= 600
    # the capacity-back sweep grants the line once the proxy's rest is over, not before
    sweep = CapacityBack(settings, Database(engine))
    assert (await sweep.run_once(now=await db_now(engine) + timedelta(seconds=300))).changed == []
    later = await db_now(engine) + timedelta(seconds=601)
    assert (await sweep.run_once(now=later)).changed
    assert (await grant_of(engine, settings, "job-2"))["proxy"]["label"] == "http://10.0.0.1:3128"


async def test_proxy_a_lease_reporting_its_failure_twice_counts_once_and_a_success_forgets(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await make_proxies(engine, settings, block_after=2)
    await processor.process(start(settings, "job-1"))
    grant = await grant_of(engine, settings, "job-1")
    lease = lease_fields(grant)
    state = sealed_state({"cookies": [], "origins": []}, "session.upload", "job-1",
                         grant["upload_key"])  # fmt: skip
    upload = request(
        settings, "session.upload", "job-1", **lease, storage_state=state, proxy_failed=True
    )
    await processor.process(upload)
    await finish(processor, engine, settings, "job-1", proxy_failed=True)
    assert await scalar(engine, "SELECT consecutive_failures FROM proxies") == 1
    assert await scalar(engine, "SELECT status::text FROM proxies") == "ACTIVE"
    await processor.process(start(settings, "job-2"))
    await finish(processor, engine, settings, "job-2")
    assert await scalar(engine, "SELECT consecutive_failures FROM proxies") == 0
    assert await scalar(engine, "SELECT failure_count FROM proxies") == 1


async def test_proxy_failures_from_many_collectors_at_once_move_every_account_once_within_k(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, capacity=6, n_accounts=6)
    # one proxy for three accounts that fails; two with room for two each, and one other
    await make_proxies(engine, settings, n=1, max_accounts=3, block_after=1)
    spare = await make_proxies(engine, settings, n=2, max_accounts=2, first=2)
    other = await make_proxies(engine, settings, n=1, max_accounts=3, first=4)
    await asyncio.gather(*(processor.process(start(settings, f"job-{n}")) for n in range(6)))
    history = await grant_history(engine)
    on_failing = [g for g in history if g["proxy_id"] not in (*spare, *other)]
    assert len(history) == 6 and on_failing
    # every collector on the failing proxy reports at once
    await asyncio.gather(
        *(finish(processor, engine, settings, g["job_id"], proxy_failed=True) for g in on_failing)
    )
    assert len(await events(engine, settings, "proxy.blocked")) == 1
    moved = await events(engine, settings, "account.repinned")
    assert sorted(int(e["id"]) for e in moved) == sorted(g["account_id"] for g in on_failing)
    loads = await scalar(
        engine,
        "SELECT json_object_agg(p.id, (SELECT count(*) FROM accounts a WHERE a.proxy_id = p.id))"
        " FROM proxies p",
    )
    assert all(loads[str(p)] <= 2 for p in spare) and loads[str(other[0])] <= 3
    assert (
        sum(loads.values())
        + await scalar(engine, "SELECT count(*) FROM accounts WHERE proxy_id IS NULL")
        == 6
    )


async def test_proxy_whose_url_no_key_opens_is_blocked_and_the_line_goes_on_through_another(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await set_site(engine, "board", proxy_required=True)
    async with engine.begin() as conn:  # sealed with a key since dropped from QM_SECRET_KEYS
        lost = SecretBox(Fernet.generate_key().decode())
        await add_proxy(conn, site="board", label="http://10.0.0.9:3128",
                        url_sealed=lost.seal(proxy_url(9)))  # fmt: skip
    await make_proxies(engine, settings, first=2)
    await processor.process(start(settings, "job-1"))
    await processor.process(start(settings, "job-2"))
    [refused] = await answers(engine, settings, "job-1")
    assert (refused["type"], refused["reason"]) == ("job.rejected", "proxy_unreadable")
    assert await scalar(engine, "SELECT status::text FROM proxies WHERE id = 1") == "BLOCKED"
    assert await scalar(engine, "SELECT status::text FROM accounts") == "USING"  # not retired
    assert (await grant_of(engine, settings, "job-2"))["proxy"]["label"] == "http://10.0.0.2:3128"


async def test_proxy_failure_reported_by_a_zombie_or_a_forger_changes_nothing(
    processor: RequestProcessor, engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings)
    await make_proxies(engine, settings, block_after=1)
    await processor.process(start(settings, "job-1"))
    old = lease_fields(await grant_of(engine, settings, "job-1"))
    await finish(processor, engine, settings, "job-1")
    await processor.process(start(settings, "job-2"))
    live = await grant_of(engine, settings, "job-2")
    # the zombie of job-1 finishes again; a forger uploads for job-2 with the token, not the secret
    await processor.process(request(settings, "job.finish", "job-1", **old, outcome="failed",
                                    proxy_failed=True))  # fmt: skip
    state = sealed_state({"cookies": [], "origins": []}, "session.upload", "job-2",
                         live["upload_key"])  # fmt: skip
    forged = {"lease_token": live["lease_token"], "lease_secret": "F" * 43}
    await processor.process(request(settings, "session.upload", "job-2", **forged,
                                    storage_state=state, proxy_failed=True))  # fmt: skip
    lost = [r["reason"] for r in await replies(engine, settings) if r["type"] == "job.lease_lost"]
    assert lost == ["job_succeeded", "wrong_secret"]
    row = "SELECT status::text || ' ' || failure_count FROM proxies"
    assert await scalar(engine, row) == "ACTIVE 0"
    assert not await events(engine, settings, "proxy.failed")
