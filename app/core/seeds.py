"""Seeds: handed to a lease and taken back (the grant, ``seeds.claim``, finish, cancel and the
reaper), and a site's seeds imported. Each runs inside the caller's transaction and writes its events to its outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from app.core.replies import refuse_follow_up
from app.core.transaction import Route, Tx
from app.lease_secrets import lease_secret_hash
from app.seed_files import Refused, SeedRow
from app.store import Conn, Row, domains, seeds
from schemas.messages import GrantedSeed, SeedResult, SeedsClaim, SeedsClaimed
from schemas.states import SeedStatus
from schemas.values import seed_id

log = structlog.get_logger()

IMPORT_BATCH = 10_000  # rows per COPY: the progress bar's step, and the memory an import holds


async def hand_out(
    tx: Tx,
    *,
    job_id: str,
    lease_token: int,
    secret_hash: bytes | None,
    limit: int,
    now: datetime | None = None,
) -> list[GrantedSeed] | None:
    """Up to ``limit`` due seeds to the job's live lease, URLs rewritten on the way out.

    None when the lease is not live or ``secret_hash`` is not its secret's (the claim changed
    nothing); an empty list when none is due.
    """
    claimed = await seeds.claim_seeds(
        tx.conn,
        job_id=job_id,
        lease_token=lease_token,
        secret_hash=secret_hash,
        limit=limit,
        now=now,
    )
    if not claimed.live:
        return None
    if not claimed.seeds:
        return []
    site = claimed.seeds[0]["site"]
    urls = await domains.rewrite_urls(tx.conn, site, [row["url"] for row in claimed.seeds])
    for row in claimed.seeds:
        tx.events.emit(
            "seed",
            "assigned",
            id=str(row["id"]),
            site=site,
            status="ASSIGNED",
            job_id=job_id,
            history=row,
        )
    log.info("seeds_assigned", job_id=job_id, lease_token=lease_token, seeds=len(claimed.seeds))
    return [
        GrantedSeed(id=str(row["id"]), url=url)
        for row, url in zip(claimed.seeds, urls, strict=True)
    ]


async def move_seed(
    tx: Tx, *, site: str, seed: str, target: SeedStatus, reason: str | None = None
) -> Row | None:
    """An operator's disable or enable of a seed (``seed.disabled`` / ``seed.enabled``). A
    disable of a held seed ends that hold, so its event names the hold's lease token: the
    history ``qm audit`` reads sees the seed returned before it is handed out again."""
    row = await seeds.set_seed_status(tx.conn, site=site, seed=seed, target=target, reason=reason)
    if row is None:
        return None
    disabled = target == SeedStatus.DISABLED
    tx.events.emit(
        "seed",
        "disabled" if disabled else "enabled",
        id=str(row["id"]),
        site=site,
        status=str(row["status"]),
        job_id=row["previous_holder"],
        reason=row["disabled_reason"] if disabled else None,
        history={"db_at": row["db_at"], "lease_token": row["previous_token"]},
    )
    return row


async def hand_out_with_grant(tx: Tx, job: Row, now: datetime | None = None) -> list[GrantedSeed]:
    """The seeds a job just granted asked for (``needs.seeds``), in the grant's transaction."""
    if not job["needs_seeds"]:
        return []
    granted = await hand_out(
        tx,
        job_id=job["id"],
        lease_token=job["lease_token"],
        secret_hash=job["lease_secret_hash"],  # the grant's own, just written
        limit=job["needs_seeds"],
        now=now,
    )
    return granted or []


async def claim(tx: Tx, req: SeedsClaim, route: Route) -> dict[str, Any]:
    """Hand the live lease up to ``limit`` due seeds (none due: an empty ``seeds.claimed``); a
    stale token, a wrong secret or a lapsed lease gets ``job.lease_lost`` and nothing changes."""
    granted = await hand_out(
        tx,
        job_id=req.job_id,
        lease_token=req.lease_token,
        secret_hash=lease_secret_hash(req.lease_secret),
        limit=req.limit,
    )
    if granted is None:
        return await refuse_follow_up(tx, req, "seeds_claim_refused")
    return SeedsClaimed(request_id=req.request_id, job_id=req.job_id, seeds=granted).model_dump(
        mode="json"
    )


def _outcomes(results: Sequence[SeedResult]) -> list[seeds.Outcome]:
    """The results as the store takes them; the last result of a seed counts, and an id that is
    not ASCII digits of a bigint cannot be one of ours (the schema refuses it before this)."""
    by_id: dict[int, seeds.Outcome] = {}
    for result in results:
        try:
            number = int(seed_id(result.seed_id))
        except ValueError:
            continue
        by_id[number] = seeds.Outcome(number, result.ok, result.next_due_seconds, result.reason)
    return list(by_id.values())


async def settle(
    tx: Tx,
    job: Row,
    *,
    results: Sequence[SeedResult] = (),
    release_reason: str,
    now: datetime | None = None,
) -> list[Row]:
    """Everything the job's lease holds goes back: reported seeds by their result, the rest
    ACTIVE and due at once (ending with ``release_reason``: finished, cancelled, expired)."""
    settings = tx.settings
    policy = seeds.Policy(
        settings.seed_failures_to_disable,
        settings.seed_backoff_seconds,
        settings.seed_backoff_max_seconds,
    )
    settled = await seeds.settle_seeds(
        tx.conn,
        job_id=job["id"],
        lease_token=job["lease_token"],
        outcomes=_outcomes(results),
        policy=policy,
        release_reason=release_reason,
        now=now,
    )
    for row in settled:
        what = _event(row)
        tx.events.emit(
            "seed",
            what,
            id=str(row["id"]),
            site=row["site"],
            status=str(row["status"]),
            job_id=job["id"],
            reason=row["disabled_reason"] if what == "disabled" else None,
            history=row,
        )
    if settled:
        log.info(
            "seeds_settled",
            job_id=job["id"],
            lease_token=job["lease_token"],
            seeds=len(settled),
            reason=release_reason,
        )
    return settled


def _event(row: Row) -> str:
    if row["ok"] is None:
        return "released"
    if row["ok"]:
        return "done"
    return "disabled" if row["status"] == "DISABLED" else "failed"


# --- import ------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import did: rows added, updated, unchanged, and the refused ones by line."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    refused: list[Refused] = field(default_factory=list)


async def import_rows(
    conn: Conn,
    site: str,
    items: Iterable[SeedRow | Refused],
    *,
    batch: int = IMPORT_BATCH,
    progress: Callable[[int], None] = lambda rows: None,
) -> ImportSummary:
    """Load parsed rows into a site's seeds in the caller's transaction: COPY into a temporary
    table batch by batch (``progress`` hears each batch's size), then one upsert by URL."""
    summary = ImportSummary()
    await seeds.begin_import(conn)
    loaded = 0
    pending: list[tuple[int, str, int, int]] = []
    for item in items:
        if isinstance(item, Refused):
            summary.refused.append(item)
            continue
        pending.append(item.record())
        if len(pending) >= batch:
            await seeds.copy_import_rows(conn, pending)
            loaded += len(pending)
            progress(len(pending))
            pending = []
    if pending:
        await seeds.copy_import_rows(conn, pending)
        loaded += len(pending)
        progress(len(pending))
    summary.added, summary.updated = await seeds.finish_import(conn, site)
    summary.unchanged = loaded - summary.added - summary.updated
    return summary
