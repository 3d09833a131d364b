"""The claim worker's core: each request's inbox row, transition and outbox reply commit together.

Records are handed over in the order they were read and wait for the worker's transactions
(``QM_WORKER_TRANSACTIONS``), which take them in that order (group commit, ``QM_WORKER_BATCH_MAX``):
one BEGIN, one outbox insert and one COMMIT for all of them. Two requests of one job are never in
two running transactions (``workers.pipeline.KeyedQueue``), so a job's requests commit in the
order they were read. The transaction first locks every site its requests touch, in slug order, so
two of them cannot deadlock; then it applies the requests one after another, exactly as separate
transactions would. If it fails for any reason, each of its requests goes again alone, in order,
in a transaction of its own, so one bad request never holds up the others for long.

A request whose ``request_id`` was seen before is answered again from the inbox, unless it is the
very record that first claimed it (same topic, partition, offset and timestamp), read again after a
crash: its reply was committed with its transition, so it gets no second one.

Every transaction takes its locks in one order (docs/design.md): sites (in slug order), inbox
rows, jobs, accounts, sessions, outbox keys. Locking the sites first also puts the answer to a
repeated request under the lock of every transition that could change that answer, so a job's
replies leave in the order its transitions happened.

A ``reply_to`` header must match ``QM_REPLY_TOPIC_PATTERN`` (by default the prefix's replies
topic and ``replies.*``); a record naming any other topic is refused as invalid, and its
``request.invalid`` goes to the default replies topic. A ``qm.reply_partition`` header sends the
request's replies to that partition of its reply topic (and a job.start's job keeps it for its
later replies); one that is not a non-negative integer is refused as invalid, and its
``request.invalid`` goes where the job id's key sends it.

Failures follow one classification (``app.errors``): invalid input is dead-lettered at once with a
``request.invalid`` reply; transient infrastructure errors are retried in place for as long as it
takes; unexpected exceptions are retried a few times with capped backoff, then dead-lettered.

What a collector hears: a reply only once the outcome is final. A request retried in place gets
its one reply when it finally succeeds. Bad input is final (replaying it fails the same way), so
it is answered ``request.invalid`` where a correlation id can be read. A request dead-lettered
after unexpected errors gets no reply: its dead letter may be replayed once the cause is fixed,
and the reply it gets then is its only one; the collector's own timeout ends its wait meanwhile
(and the SDK releases a grant that comes after it gave up).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from app.crypto import SecretBox
from app.dlt import Origin, dead_letter_headers, dlt_topic, header
from app.dlt.headers import Header, value_ref_headers
from app.errors import Disposition, InvalidMessage, classify, describe, unexpected_delay
from app.health import REQUEST_SECONDS, REQUESTS
from app.leasing import Services, Tx
from app.settings import Settings
from app.store import Database, dlt_values, inbox
from schemas.messages import (
    CORRELATION_ID,
    REPLY_PARTITION,
    REPLY_TO,
    AnyRequest,
    JobStart,
    RequestConflict,
    RequestInvalid,
    parse_reply_partition,
    parse_request,
)
from workers import captures, jobs, seeds, sessions
from workers.consuming import Incoming
from workers.group_commit import GroupCommit
from workers.retrying import TransientRetry

log = structlog.get_logger()

Handler = Callable[[Tx, Any, str, str], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[str, Handler] = {
    "job.start": jobs.start,
    "job.heartbeat": jobs.heartbeat,
    "job.finish": jobs.finish,
    "job.cancel": jobs.cancel,
    "session.upload": sessions.upload,
    "capture.submit": captures.submit,
    "seeds.claim": seeds.claim,
}
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class ReplyTopicRefused(InvalidMessage):
    """A ``reply_to`` header that names a topic requests may not reply to."""


class ReplyPartitionRefused(InvalidMessage):
    """A ``qm.reply_partition`` header that names no partition."""


@dataclass(frozen=True)
class Parsed:
    """A request read from its record: where its answer goes and with which correlation id."""

    request: AnyRequest
    reply_to: str
    correlation_id: str
    partition: int  # where its record was read (a redelivery of the record is told apart)
    offset: int
    reply_partition: int | None = None  # None: the job id's key picks the partition
    topic: str = ""  # the record's topic and timestamp: a topic made again reuses offsets
    timestamp_ms: int = 0

    @property
    def position(self) -> tuple[str, int, int, int]:
        """Where the record was read: a redelivery of the very record has the same."""
        return (self.topic, self.partition, self.offset, self.timestamp_ms)

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(CORRELATION_ID, self.correlation_id)]


def fingerprint(request: AnyRequest) -> str:
    """Hash of the request's canonical JSON: equal bodies, equal fingerprints."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def _claim(parsed: Parsed) -> inbox.Claim:
    request = parsed.request
    return inbox.Claim(
        str(request.request_id),
        request.job_id,
        request.type,
        fingerprint(request),
        parsed.partition,
        parsed.offset,
        parsed.topic,
        parsed.timestamp_ms,
    )


@dataclass(frozen=True, eq=False)
class Pending:
    """A record handed over, waiting for its transaction."""

    record: Incoming
    parsed: Parsed | None  # None: it does not parse (it goes alone, where that is classified)


class RequestProcessor:
    """Processes request records; a record's outcome is never an exception.

    ``submit`` hands a record over and returns at once (the consumer reads on); ``process``
    also waits for the outcome. Records go into the shared transactions in the order they were
    handed over, a job's requests never in two at once (``workers.group_commit``).
    """

    def __init__(self, settings: Settings, db: Database, secrets: SecretBox | None = None) -> None:
        self.settings = settings
        self.db = db
        self.services = Services(settings, secrets or SecretBox.from_settings(settings))
        self._reply_topics = re.compile(settings.reply_topics())
        self._retry_transient = TransientRetry("worker", settings.transient_retry_max_seconds)
        self._group: GroupCommit[Pending] = GroupCommit(
            batch_max=settings.worker_batch_max,
            transactions=settings.worker_transactions,
            shared=lambda taken: self._transact([p.parsed for p in taken if p.parsed]),
            alone=lambda pending: self._process(pending.record),
            retry_max_seconds=settings.unexpected_retry_max_seconds,
        )

    async def submit(self, record: Incoming, finished: Callable[[], None]) -> None:
        """Hand ``record`` over; ``finished`` is called once its outcome is final."""
        outcome = self.enqueue(record)
        outcome.add_done_callback(lambda done: None if done.cancelled() else finished())

    async def process(self, record: Incoming) -> str:
        """Handle a record; returns what happened (replied, duplicate, redelivered, conflict,
        dead_lettered)."""
        return await self.enqueue(record)

    def enqueue(self, record: Incoming) -> asyncio.Future[str]:
        """Put ``record`` in line for a transaction; its outcome, once it has one."""
        started = time.perf_counter()
        try:
            parsed: Parsed | None = self._parse(record)
        except Exception:  # noqa: BLE001 - the record goes alone, where its failure is classified
            parsed = None
        key = None if parsed is None else parsed.request.job_id
        outcome = self._group.put(Pending(record, parsed), key, alone=parsed is None)
        outcome.add_done_callback(partial(_count, record, started))
        return outcome

    def close(self) -> None:
        """Start no more transactions (the worker stops): the records still waiting get no
        outcome here and are read again."""
        self._group.close()

    async def drain(self) -> None:
        """Wait for the transactions in flight (when the worker stops, before its pool closes)."""
        await self._group.drain()

    async def _process(self, record: Incoming) -> str:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._retry_transient(partial(self._handle, record))
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                disposition = classify(exc)
                if (
                    disposition is Disposition.UNEXPECTED
                    and attempts < self.settings.unexpected_error_attempts
                ):
                    delay = unexpected_delay(attempts, self.settings.unexpected_retry_max_seconds)
                    log.warning(
                        "request_failed_retrying",
                        error_class=type(exc).__name__,
                        attempts=attempts,
                        retry_in=delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                await self._retry_transient(
                    partial(self._dead_letter, record, exc, attempts, disposition)
                )
                return "dead_lettered"

    def _allowed_reply_to(self, wanted: str | None) -> bool:
        return (
            wanted is not None
            and TOPIC_NAME.match(wanted) is not None
            and self._reply_topics.fullmatch(wanted) is not None
        )

    def _reply_to(self, record: Incoming) -> str:
        """Where a record's answer goes: its ``reply_to`` when allowed, else the default."""
        wanted = header(record.headers, REPLY_TO)
        return (
            wanted if wanted and self._allowed_reply_to(wanted) else self.settings.topic("replies")
        )

    def _parse(self, record: Incoming) -> Parsed:
        if record.value is None:
            raise InvalidMessage("the record's value is null")
        if len(record.value) > self.settings.max_request_bytes:
            raise InvalidMessage(
                f"request of {len(record.value)} bytes exceeds the limit of {self.settings.max_request_bytes}"
            )
        request = parse_request(record.value)
        wanted = header(record.headers, REPLY_TO)
        if wanted is not None and not self._allowed_reply_to(wanted):
            raise ReplyTopicRefused(
                f"reply_to {wanted[:249]!r} does not match the reply topic pattern "
                f"{self._reply_topics.pattern!r}"
            )
        correlation_id = header(record.headers, CORRELATION_ID) or str(request.request_id)
        if "\x00" in correlation_id:  # a job keeps it in a text column, which holds no NUL
            raise InvalidMessage("correlation_id must not contain the NUL character (U+0000)")
        return Parsed(
            request,
            wanted or self.settings.topic("replies"),
            correlation_id,
            record.partition,
            record.offset,
            _reply_partition(record),
            record.topic,
            record.timestamp_ms,
        )

    async def _handle(self, record: Incoming) -> str:
        [outcome] = await self._transact([self._parse(record)])
        return outcome

    async def _transact(self, requests: list[Parsed]) -> list[str]:
        """Apply ``requests`` in order in one transaction; their outcomes."""
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            # the first locks of every transaction, alone or shared: the sites (lock order),
            # then the requests' inbox rows, in one statement
            claimed = await inbox.claim_requests(
                conn,
                [_claim(p) for p in requests],
                slugs=[p.request.site for p in requests if isinstance(p.request, JobStart)],
                job_ids=[p.request.job_id for p in requests if not isinstance(p.request, JobStart)],
            )
            tx.locked_sites, tx.job_sites = claimed.sites, claimed.job_sites
            unseen = claimed.fresh
            outcomes = []
            for parsed in requests:  # a request_id twice here: the first is new, then a repeat
                request_id = str(parsed.request.request_id)
                outcomes.append(await self._apply(tx, parsed, fresh=request_id in unseen))
                unseen.discard(request_id)
            await tx.flush()
            for parsed in requests:
                self._fault("mid_transaction", parsed.request.job_id)
        for parsed, outcome in zip(requests, outcomes, strict=True):
            self._fault("after_commit", parsed.request.job_id)
            log.debug(
                "request_processed",
                request_id=str(parsed.request.request_id),
                job_id=parsed.request.job_id,
                outcome=outcome,
            )
        return outcomes

    async def _apply(self, tx: Tx, parsed: Parsed, *, fresh: bool) -> str:
        """The request's transition and reply inside ``tx`` (``fresh``: its inbox row is new);
        its outcome."""
        request, reply_to = parsed.request, parsed.reply_to
        request_id = str(request.request_id)
        if not fresh:
            return await self._answer_again(tx, parsed)
        handler = HANDLERS.get(request.type)
        if handler is None:
            reply: dict[str, Any] | None = RequestInvalid(
                request_id=request_id,
                job_id=request.job_id,
                error=f"{request.type} is not served by this version",
            ).model_dump(mode="json")
        else:
            tx.reply_partition = parsed.reply_partition
            try:
                reply = await handler(tx, request, reply_to, parsed.correlation_id)
            finally:
                tx.reply_partition = None
        if reply is not None:
            tx.box.add(
                reply_to, request.job_id, reply, parsed.headers, partition=parsed.reply_partition
            )
            tx.box.keep_reply(request_id, reply_to, reply)
        return "replied"

    def _fault(self, point: str, job_id: str) -> None:
        """Chaos testing: die here, as a crash would, when the settings ask for it."""
        if self.settings.fault_point == point and self.settings.fault_job_id == job_id:
            log.warning("fault_injected", point=point, job_id=job_id)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _answer_again(self, tx: Tx, parsed: Parsed) -> str:
        """A request_id seen before: the same body gets the same reply, another body a conflict.
        The very record that first claimed it, read again (its worker died before committing its
        offset), gets nothing more: its reply was committed with its transition.

        The stored reply is read under the site's lock (taken first in ``_transact``), the lock
        every transition that changes it holds, so a stale answer cannot overtake a newer one.
        The answer goes to the partition this repeat asks for, when it goes to this repeat's
        reply topic.
        """
        request, headers = parsed.request, parsed.headers
        seen = await inbox.seen_request(tx.conn, str(request.request_id))
        assert seen is not None
        if seen["fingerprint"] != fingerprint(request):
            conflict = RequestConflict(request_id=request.request_id, job_id=request.job_id)
            tx.box.add(
                parsed.reply_to,
                request.job_id,
                conflict.model_dump(mode="json"),
                headers,
                partition=parsed.reply_partition,
            )
            log.info("request_conflict", request_id=str(request.request_id), job_id=request.job_id)
            return "conflict"
        first = (
            seen["record_topic"],
            seen["record_partition"],
            seen["record_offset"],
            seen["record_timestamp"],
        )
        if first == parsed.position:
            log.info("request_redelivered", request_id=str(request.request_id))
            return "redelivered"
        kept = tx.box.kept_reply(str(request.request_id))  # answered earlier in this transaction
        topic, reply = (kept.topic, kept.reply) if kept else (seen["reply_topic"], seen["reply"])
        if reply is not None:
            partition = parsed.reply_partition if topic == parsed.reply_to else None
            tx.box.add(topic, request.job_id, reply, headers, partition=partition)
        return "duplicate"

    async def _dead_letter(
        self, record: Incoming, error: BaseException, attempts: int, disposition: Disposition
    ) -> None:
        """The record to ``<topic>.dlt`` with its headers; bad input also gets request.invalid
        where answerable (an unexpected failure is not final, so it gets no reply)."""
        message = describe(error)
        value, headers, stored = self._dead_letter_value(record, error, attempts, message)
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            if stored is not None:
                await dlt_values.store_value(conn, stored)
            tx.box.add(dlt_topic(record.topic), record.key, value, headers)
            if disposition is Disposition.INVALID:
                self._answer_invalid(tx, record, message)
            await tx.flush()
        log.warning(
            "request_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(error).__name__,
            attempts=attempts,
            value_ref=stored.ref if stored is not None else None,
        )

    def _dead_letter_value(
        self, record: Incoming, error: BaseException, attempts: int, message: str
    ) -> tuple[bytes | None, list[Header], dlt_values.StoredValue | None]:
        """The dead letter's value and headers. A value too large to travel inline is left out
        and referenced by a header; it is returned to be stored beside the dead letter."""
        origin = Origin(
            record.topic,
            record.partition,
            record.offset,
            record.timestamp_ms,
            self.settings.consumer_group,
        )
        headers = dead_letter_headers(record.headers, origin, error, attempts, message=message)
        # a session state sent in the clear never reaches the dead-letter topic or its table
        kept = None if record.value is None else sessions.without_clear_sessions(record.value)
        if kept is None or (
            _record_size(record.key, kept, headers) <= self.settings.dlt_inline_max_bytes
        ):
            return kept, headers, None
        stored = dlt_values.StoredValue.of(kept)
        return None, headers + value_ref_headers(stored.ref, kept), stored

    def _answer_invalid(self, tx: Tx, record: Incoming, message: str) -> None:
        """``request.invalid`` for bad input, where a correlation id can be read."""
        ids = _readable_ids(record.value)
        correlation_id = header(record.headers, CORRELATION_ID) or ids.get("request_id")
        if not correlation_id:
            return
        invalid = RequestInvalid(
            request_id=ids.get("request_id"), job_id=ids.get("job_id"), error=message
        )
        wanted, partition = header(record.headers, REPLY_TO), None
        if wanted is None or self._allowed_reply_to(wanted):  # a partition of that topic
            with contextlib.suppress(ReplyPartitionRefused):  # else the key picks the partition
                partition = _reply_partition(record)
        tx.box.add(
            self._reply_to(record),
            ids.get("job_id") or record.key,
            invalid.model_dump(mode="json"),
            [(CORRELATION_ID, correlation_id)],
            partition=partition,
        )


def _reply_partition(record: Incoming) -> int | None:
    """The partition the record's ``qm.reply_partition`` header asks replies to go to."""
    wanted = header(record.headers, REPLY_PARTITION)
    if wanted is None:
        return None
    try:
        return parse_reply_partition(wanted)
    except ValueError as exc:
        raise ReplyPartitionRefused(str(exc)) from None


def _count(record: Incoming, started: float, outcome: asyncio.Future[str]) -> None:
    if not outcome.cancelled():
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        REQUESTS.labels(_request_type(record.value), outcome.result()).inc()


def _record_size(key: bytes | None, value: bytes | None, headers: list[Header]) -> int:
    """Bytes of a record in a batch, plus room for the outbox's own id header."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) + 128


def _request_type(raw: bytes | None) -> str:
    """The request's type for metrics; only known types, so labels stay bounded."""
    if raw is None:
        return "other"
    match = re.search(rb'"type"\s*:\s*"([a-z.]{1,32})"', raw[:4096])
    name = match.group(1).decode() if match else ""
    return name if name in HANDLERS else "other"


def _readable_ids(raw: bytes | None) -> dict[str, str]:
    """request_id and job_id of a bad record, when they can be read as short strings."""
    if raw is None:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(body, dict):
        return {}
    return {
        name: value
        for name in ("request_id", "job_id")
        if isinstance(value := body.get(name), str) and 0 < len(value) <= 200
    }
