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
    """The set path (``app.core.job_batches``) for the requests it can take: fresh ones whose
    job and request id appear once here; their replies by index. Heartbeats, then finishes, then
    starts, each kind in read order; the rest then go one by one in read order
    (docs/design.md, "One statement per kind", says why that is a serial order of them all)."""
    if len(requests) < job_batches.SMALLEST_BATCH:
        return {}
    jobs_named = Counter(p.request.job_id for p in requests)
    ids_named = Counter(str(p.request.request_id) for p in requests)
    plain = [
        (n, p)
        for n, p in enumerate(requests)
        if jobs_named[p.request.job_id] == 1
        and ids_named[str(p.request.request_id)] == 1
        and str(p.request.request_id) in fresh
    ]
    done = await job_batches.heartbeats(
        tx, [(n, p.request) for n, p in plain if isinstance(p.request, JobHeartbeat)]
    )
    done |= await job_batches.finishes(
        tx, [(n, p.request) for n, p in plain if isinstance(p.request, JobFinish)]
    )
    done |= await job_batches.starts(
        tx, [(n, p.request, p.route) for n, p in plain if isinstance(p.request, JobStart)]
    )
    return done
