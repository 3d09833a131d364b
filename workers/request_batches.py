"""The claim worker's set path: the requests of a shared transaction that go to PostgreSQL one
statement per kind (``app.core.job_batches``), and how any request's reply is sent."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from app.core import job_batches
from app.core.replies import Reply
from app.core.transaction import Tx
from schemas.messages import JobFinish, JobHeartbeat, JobStart

if TYPE_CHECKING:
    from workers.requests import Parsed


def send_reply(tx: Tx, parsed: Parsed, reply: dict[str, Any] | None) -> None:
    """A request's reply to its route, kept in its inbox row (None: it was answered already)."""
    if reply is not None:
        request = parsed.request
        tx.box.add(
            parsed.reply_to, request.job_id, reply, parsed.headers, partition=parsed.reply_partition
        )
        tx.box.keep_reply(str(request.request_id), parsed.reply_to, reply)


async def apply_batched(tx: Tx, requests: list[Parsed], fresh: set[str]) -> dict[int, Reply]:
    """The set path (``app.core.job_batches``) for the requests it can take; their replies by
    index. Heartbeats, then finishes, then starts, each kind in read order; the rest then go one
    by one in read order (docs/design.md, "One statement per kind", says why that is a serial
    order of them all that keeps each site's read order)."""
    if len(requests) < job_batches.SMALLEST_BATCH:
        return {}
    heartbeats, finishes, starts = _taken(tx, requests, fresh)
    done = await job_batches.heartbeats(tx, [(n, p.request) for n, p in heartbeats])
    done |= await job_batches.finishes(tx, [(n, p.request) for n, p in finishes])
    done |= await job_batches.starts(tx, [(n, p.request, p.route) for n, p in starts])
    return done


Taken = list[tuple[int, Any]]


def _taken(tx: Tx, requests: list[Parsed], fresh: set[str]) -> tuple[Taken, Taken, Taken]:
    """The plain heartbeats, finishes and starts the set path takes: fresh requests whose job
    and request id appear once here, plain for their kind, at least ``SMALLEST_BATCH`` of a kind;
    and a finish or start only on a site no other request of this transaction changes, so the
    requests of each site keep their read order."""
    jobs_named = Counter(p.request.job_id for p in requests)
    ids_named = Counter(str(p.request.request_id) for p in requests)
    candidates = [
        (n, p)
        for n, p in enumerate(requests)
        if jobs_named[p.request.job_id] == 1
        and ids_named[str(p.request.request_id)] == 1
        and str(p.request.request_id) in fresh
    ]
    heartbeats = _enough(
        [(n, p) for n, p in candidates
         if isinstance(p.request, JobHeartbeat) and job_batches.plain_heartbeat(tx, p.request)]
    )  # fmt: skip
    finishes = [(n, p) for n, p in candidates
                if isinstance(p.request, JobFinish) and job_batches.plain_finish(tx, p.request)]  # fmt: skip
    starts = [(n, p) for n, p in candidates
              if isinstance(p.request, JobStart) and job_batches.plain_start(tx, p.request)]  # fmt: skip
    ordered: set[str] = set()  # sites another request changes: their requests go in read order
    while True:
        taken_finishes = _enough([(n, p) for n, p in finishes if _site(tx, p) not in ordered])
        taken_starts = _enough([(n, p) for n, p in starts if _site(tx, p) not in ordered])
        taken = {n for n, _ in (*heartbeats, *taken_finishes, *taken_starts)}
        changed = {
            site
            for n, p in enumerate(requests)
            if n not in taken
            and str(p.request.request_id) in fresh  # a repeat is answered again, nothing more
            and _may_change_site(tx, p)
            and (site := _site(tx, p)) is not None
        }
        if changed <= ordered:  # what is left out no longer grows
            return heartbeats, taken_finishes, taken_starts
        ordered |= changed


def _may_change_site(tx: Tx, parsed: Parsed) -> bool:
    """Whether a fresh request the set path does not take may change what a grant on its site
    sees: a slot, an account, the line, a budget's units, a proxy's rest. A start it could have
    taken (its job is named twice here) may; one refused outright (over the cap, a site unknown
    or with no account) may not; nor may a heartbeat without units, which extends only its own
    lease."""
    request = parsed.request
    if isinstance(request, JobStart):
        return job_batches.plain_start(tx, request)
    if isinstance(request, JobHeartbeat):
        return request.units is not None
    return request.type in ("job.finish", "job.cancel", "session.upload")


def _enough(plain: Taken) -> Taken:
    """Fewer than two of a kind go the one-request way, exactly as alone."""
    return plain if len(plain) >= job_batches.SMALLEST_BATCH else []


def _site(tx: Tx, parsed: Parsed) -> str | None:
    """The site a request names (a start) or its job's (locked by the first statement)."""
    request = parsed.request
    return request.site if isinstance(request, JobStart) else tx.job_sites.get(request.job_id)
