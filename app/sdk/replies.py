"""Routing replies to the requests that wait for them: bookkeeping only, no Kafka.

Every client reads the whole reply topic, so most replies it sees belong to other clients; those are
dropped by ``correlation_id`` before they are even parsed. A reply is one of its own only when its
``job_id`` and ``request_id`` are those of the request too: correlation ids are visible to every
reader, and any writer of requests may reuse one, so a hostile request's reply (a ``job.lease_lost``
for a job of its own, say) never settles another client's request or ends its lease. Of its own
replies it keeps:

- a future per outstanding request (``Waiter``), resolved by the final reply; a ``job.queued`` only
  notes the position, because the final ``job.granted``/``job.rejected`` follows later;
- the ``qm.message_id`` of recent replies, so that a relay's republish is delivered once;
- the correlation ids of ``job.start`` requests whose caller gave up (or that were answered
  ``request.failed``, raised as ``RequestFailed``), so that a grant arriving for one of them is
  handed back to the client to release instead of holding an account nobody uses.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from app.sdk.errors import ReplyUnreadable, RequestFailed
from app.sdk.logs import sdk_logger
from schemas.messages import (
    AnyReply,
    JobGranted,
    JobLeaseLost,
    JobQueued,
    RequestConflict,
    parse_reply,
)
from schemas.messages import RequestFailed as RequestFailedReply

log = sdk_logger(__name__)

INTERIM_TYPES = frozenset({"job.queued"})


class RecentIds:
    """A bounded set of recently seen ids; the oldest are forgotten first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, item: str) -> bool:
        """Remember ``item``; False when it was already remembered."""
        if item in self._ids:
            self._ids.move_to_end(item)
            return False
        self._ids[item] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class RecentMap:
    """A bounded mapping of recent keys to values; the oldest are forgotten first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()

    def put(self, key: str, value: str) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: str) -> str | None:
        return self._items.get(key)

    def pop(self, key: str) -> str | None:
        return self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Release:
    """A grant nobody will use: the job to cancel, and the lease token and sealed lease secret
    (opened by the client) that may cancel it."""

    job_id: str
    lease_token: int
    sealed_secret: str


def _release(job_id: str, reply: AnyReply) -> Release | None:
    """What to release for the final reply of an abandoned start: its grant, if it is one."""
    if isinstance(reply, JobGranted):
        return Release(job_id, reply.lease_token, reply.lease_secret)
    return None


def _answers(reply: AnyReply, correlation_id: str, job_id: str) -> bool:
    """Whether ``reply`` answers the request sent with ``correlation_id`` for ``job_id`` (the
    SDK sends every request with its ``request_id`` as its correlation id)."""
    request_id = getattr(reply, "request_id", None)
    return reply.job_id == job_id and str(request_id) == correlation_id


@dataclass
class Waiter:
    """One outstanding request: its final reply arrives in ``final``."""

    correlation_id: str
    job_id: str
    final: asyncio.Future[AnyReply]
    queued_position: int | None = field(default=None)
    is_start: bool = False

    @property
    def queued(self) -> bool:
        """Whether Quartermaster answered ``job.queued`` (so the wait may last ``wait_seconds``)."""
        return self.queued_position is not None


class ReplyRouter:
    """The futures map by ``correlation_id``, the message-id dedup and the abandoned grants."""

    def __init__(self, *, seen_capacity: int = 10_000, abandoned_capacity: int = 10_000) -> None:
        self._waiting: dict[str, Waiter] = {}
        self._seen = RecentIds(seen_capacity)
        self._abandoned = RecentMap(abandoned_capacity)
        self._leases: dict[str, tuple[str, Callable[[str], None]]] = {}

    def watch_lease(self, correlation_id: str, job_id: str, on_lost: Callable[[str], None]) -> None:
        """After a grant: a ``job.lease_lost`` that later comes for the start request of
        ``job_id`` (the reaper or an operator took the lease) calls ``on_lost`` with its
        reason."""
        self._leases[correlation_id] = (job_id, on_lost)

    def unwatch_lease(self, correlation_id: str) -> None:
        self._leases.pop(correlation_id, None)

    @property
    def outstanding(self) -> int:
        """How many requests wait for a reply."""
        return len(self._waiting)

    def is_abandoned(self, correlation_id: str) -> bool:
        return correlation_id in self._abandoned

    def expect(self, correlation_id: str, job_id: str, *, is_start: bool = False) -> Waiter:
        """Register a request before it is sent (its reply may come back before send returns)."""
        if correlation_id in self._waiting:
            raise ValueError(f"correlation_id {correlation_id} is already waiting for a reply")
        future = asyncio.get_running_loop().create_future()
        waiter = Waiter(correlation_id, job_id, future, is_start=is_start)
        self._waiting[correlation_id] = waiter
        return waiter

    def forget(self, correlation_id: str) -> None:
        """Drop a request whose caller has its final reply."""
        self._waiting.pop(correlation_id, None)

    def abandon(self, correlation_id: str, *, release_grant: bool) -> Release | None:
        """The caller gave up waiting.

        With ``release_grant`` (a ``job.start``) the correlation id is remembered, so a grant that
        arrives later is released. Returns what to release now when the grant had already
        arrived but its caller never took it.
        """
        waiter = self._waiting.pop(correlation_id, None)
        if waiter is None or not release_grant:
            return None
        final = waiter.final
        if final.done() and not final.cancelled() and final.exception() is None:
            return _release(waiter.job_id, final.result())
        self._abandoned.put(correlation_id, waiter.job_id)
        return None

    def fail_all(self, error: BaseException) -> None:
        """Fail every outstanding request (the client is closing)."""
        for waiter in self._waiting.values():
            if not waiter.final.done():
                waiter.final.set_exception(error)
        self._waiting.clear()

    def route(
        self, correlation_id: str | None, message_id: str | None, value: bytes
    ) -> Release | None:
        """Deliver one record of the reply topic.

        Returns what to release when the record is a grant for a request whose caller gave up;
        None otherwise (delivered, a duplicate, or another client's reply).
        """
        if correlation_id is None:
            return None
        waiter = self._waiting.get(correlation_id)
        if waiter is None and correlation_id in self._leases:
            self._lease_news(correlation_id, message_id, value)
            return None
        if waiter is None and correlation_id not in self._abandoned:
            return None  # another client's reply, or one whose caller already has its answer
        if message_id is not None and not self._seen.add(message_id):
            log.debug(
                "reply_duplicate_ignored", correlation_id=correlation_id, message_id=message_id
            )
            return None
        try:
            reply = parse_reply(value)
        except ValidationError as exc:
            log.warning(
                "reply_unreadable", correlation_id=correlation_id, error_count=exc.error_count()
            )
            if waiter is not None:
                self._settle(
                    waiter, ReplyUnreadable(f"reply to {correlation_id} is not a v1 reply")
                )
            return None
        job_id = waiter.job_id if waiter is not None else self._abandoned.get(correlation_id)
        if job_id is None or not _answers(reply, correlation_id, job_id):
            log.info("reply_not_ours_ignored", correlation_id=correlation_id, reply_type=reply.type)
            return None
        if waiter is not None:
            if isinstance(reply, RequestConflict) and waiter.is_start:
                # an SDK start never repeats its request_id with another body: this answers
                # another writer that reused it (seen on the job.queued), not this client
                log.info(
                    "reply_not_ours_ignored", correlation_id=correlation_id, reply_type=reply.type
                )
                return None
            self._deliver(waiter, reply)
            return None
        return self._settle_abandoned(correlation_id, reply)

    def _lease_news(self, correlation_id: str, message_id: str | None, value: bytes) -> None:
        """A reply to a granted start: only a later ``job.lease_lost`` of the same job and start
        request means anything (one for another job reused the correlation id)."""
        if message_id is not None and not self._seen.add(message_id):
            return
        try:
            reply = parse_reply(value)
        except ValidationError:
            return
        job_id, on_lost = self._leases[correlation_id]
        if isinstance(reply, JobLeaseLost) and _answers(reply, correlation_id, job_id):
            del self._leases[correlation_id]
            on_lost(reply.reason)

    def _deliver(self, waiter: Waiter, reply: AnyReply) -> None:
        if isinstance(reply, JobQueued):
            waiter.queued_position = reply.position
            log.info(
                "job_queued", job_id=waiter.job_id, position=reply.position, reason=reply.reason
            )
            return
        if isinstance(reply, RequestFailedReply):
            if waiter.is_start:  # nothing granted; a replay of its dead letter may grant it
                self._abandoned.put(waiter.correlation_id, waiter.job_id)
            self._settle(waiter, RequestFailed(waiter.job_id, reply.error_class))
            return
        self._settle(waiter, reply)

    def _settle(self, waiter: Waiter, outcome: AnyReply | BaseException) -> None:
        self._waiting.pop(waiter.correlation_id, None)
        if waiter.final.done():
            return
        if isinstance(outcome, BaseException):
            waiter.final.set_exception(outcome)
        else:
            waiter.final.set_result(outcome)

    def _settle_abandoned(self, correlation_id: str, reply: AnyReply) -> Release | None:
        if reply.type in INTERIM_TYPES:
            return None  # still waiting server-side; the final answer decides
        job_id = self._abandoned.pop(correlation_id)
        return None if job_id is None else _release(job_id, reply)
