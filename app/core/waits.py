"""Why a waiting job waits and what happened to a job, in words: what `qm jobs show` and the
web console's job page both say."""

from __future__ import annotations

from datetime import datetime

from app.store import Row
from schemas.states import JobStatus


def when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


# what holds a site's line besides capacity and accounts (docs/policy.md)
POLICY_HOLDS = {
    "budget": "the use budgets hold the line: every rested account used its budget in its window, "
    "or the site's grants a minute are used; granted within one sweep once they refill "
    "(docs/policy.md)",
    "rate_limited": "every rested account rests for the scope of the job at the head of the line "
    "(a rate limit); granted within one sweep after its reset (docs/policy.md)",
    "proxy": "no rested account has a usable proxy (each goes out through its own, which rests or "
    "is blocked, or none has room): `qm proxies list SITE` (docs/policy.md)",
}


def wait_reasons(job: Row, held_by: str | None = None) -> list[str]:
    """Why a waiting job is not granted yet, as the site stands now (``held_by``: what holds
    the site's line, ``app.store.budgets.why_waiting``)."""
    reasons = []
    if job["ahead"]:
        reasons.append(
            f"{job['ahead']} job(s) of its site wait ahead of it (first come, first served)"
        )
    if job.get("paused_capacity") is not None:
        reasons.append(
            f"the site is paused by an operator: nothing is granted until it is resumed "
            f"(`qm sites resume {job['site']}`)"
        )
    elif job["running"] >= job["capacity"]:
        reasons.append(
            f"the site is at capacity ({job['running']} running of {job['capacity']}); "
            f"a slot frees when a lease ends{_soonest(' (the soonest at {})', job['next_lease_end'])}"
        )
    if job["needs_account"] and not job["accounts_ready"]:
        reasons.append(_no_account(job))
    if held_by in POLICY_HOLDS:
        reasons.append(POLICY_HOLDS[held_by])
    return reasons or ["nothing: it is granted within one reaper sweep"]


def _soonest(template: str, at: datetime | None) -> str:
    return "" if at is None else template.format(when(at))


def _no_account(job: Row) -> str:
    if not job["accounts_usable"]:
        return f"the site has no account in service: add one with `qm accounts add {job['site']} …`"
    candidates = [
        (at, why)
        for at, why in (
            (job["next_rested_at"], "cooldown after use"),
            (job["next_lease_end"], "lease of another job"),
            (job["next_block_end"], "block cooldown"),
        )
        if at is not None
    ]
    if not candidates:
        return (
            f"no account free: {job['accounts_blocked_for_operator']} blocked until an operator "
            f"unblocks (`qm accounts unblock {job['site']} USER`)"
        )
    at, why = min(candidates, key=lambda pair: pair[0])
    return f"no account free until {when(at)} ({why})"


def job_history(job: Row, grants: list[Row]) -> list[tuple[datetime, str]]:
    """The job's transitions: queued, each grant and its end, its final state."""
    events: list[tuple[datetime, str]] = [(job["created_at"], "QUEUED (job.start)")]
    for grant in grants:
        account = f", account {grant['account_username'] or grant['account_id'] or '-'}"
        events.append((grant["granted_at"], f"RUNNING: lease {grant['lease_token']}{account}"))
        if grant["ended_at"] is not None:
            events.append(
                (grant["ended_at"], f"lease {grant['lease_token']} ended: {grant['end_reason']}")
            )
    if job["status"] == JobStatus.QUEUED and grants:
        events.append((job["updated_at"], "QUEUED again (job.start after its lease expired)"))
    if job["finished_at"] is not None:
        reason = f" ({job['reason']})" if job["reason"] else ""
        events.append((job["finished_at"], f"{job['status']}{reason}"))
    return sorted(events, key=lambda event: event[0])
