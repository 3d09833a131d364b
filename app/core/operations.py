"""An operator's actions (the web console): each is the transition the CLI makes, in a
transaction whose events name the operator (``Tx(..., operator=...)``)."""

from __future__ import annotations

from app.core.captures import retry
from app.core.leases import revoke
from app.core.transaction import Tx
from app.store import Row, accounts, sites
from schemas.states import AccountStatus

# the event each operator move of an account writes
ACCOUNT_MOVES = {
    AccountStatus.BLOCKED: "blocked",
    AccountStatus.ACTIVE: "unblocked",
    AccountStatus.INACTIVE: "deactivated",
}


async def move_account(
    tx: Tx, *, site: str, username: str, target: AccountStatus, reason: str | None = None
) -> Row | None:
    """Block (ACTIVE -> BLOCKED), unblock (BLOCKED/INACTIVE -> ACTIVE) or deactivate
    (ACTIVE/BLOCKED -> INACTIVE) an idle account, as `qm accounts block|unblock|deactivate` do;
    None when it does not exist or cannot make that move (a held account is its holder's)."""
    row = await accounts.set_account_status(
        tx.conn, site=site, username=username, target=target, reason=reason
    )
    if row is not None:
        tx.events.emit(
            "account",
            ACCOUNT_MOVES[target],
            id=str(row["id"]),
            site=row["site"],
            status=str(row["status"]),
            reason=reason if target == AccountStatus.BLOCKED else None,
        )
    return row


async def revoke_lease(tx: Tx, job_id: str, reason: str) -> Row | None:
    """RUNNING -> CANCELLED, its holder told ``job.lease_lost`` (as `qm jobs revoke`)."""
    return await revoke(tx, job_id, reason)


async def retry_capture(tx: Tx, capture_id: str) -> Row | None:
    """FAILED -> RECEIVED, handed off again from its first attempt (as `qm captures retry`)."""
    return await retry(tx, capture_id, reason=f"retried by operator {tx.events.operator}")


async def pause_site(tx: Tx, slug: str) -> Row | None:
    """Capacity -> 0, the capacity kept to come back on resume; running jobs finish, nothing
    is granted meanwhile. None when there is no such site or it is paused already."""
    row = await sites.pause_site(tx.conn, slug)
    if row is not None:
        tx.events.emit(
            "site",
            "paused",
            id=slug,
            site=slug,
            status="PAUSED",
            history={"db_at": row["db_at"], "capacity": row["capacity"]},
        )
    return row


async def resume_site(tx: Tx, slug: str) -> Row | None:
    """The paused capacity comes back; waiting jobs are granted within one capacity-back sweep.
    None when there is no such site or it is not paused."""
    row = await sites.resume_site(tx.conn, slug)
    if row is not None:
        tx.events.emit(
            "site",
            "resumed",
            id=slug,
            site=slug,
            status="ACTIVE",
            history={"db_at": row["db_at"], "capacity": row["capacity"]},
        )
    return row


def record_replay(tx: Tx, topic: str, summary: str) -> None:
    """A replay of dead letters (it happened on the broker, `qm dlt replay`'s way): its event,
    keyed by the dead-letter topic; ``summary`` says what was selected and sent."""
    tx.events.emit("dead_letter", "replayed", id=topic, site="", status="REPLAYED", reason=summary)
