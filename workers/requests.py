"""The claim worker's core: each request's inbox row, transition and outbox reply commit together.

Records are handed over in the order they were read and wait for the worker's transactions
(``QM_WORKER_TRANSACTIONS``), which take them in that order (group commit, ``QM_WORKER_BATCH_MAX``):
one BEGIN, one outbox insert and one COMMIT for all of them. Two requests of one job are never in
two running transactions (``workers.pipeline.KeyedQueue``), so a job's requests commit in the
order they were read. The transaction first locks every site its requests touch, in slug order, so
two of them cannot deadlock; then it applies the requests as separate transactions would in some
order: the plain heartbeats, finishes and starts one statement per kind (``workers.request_batches``,
docs/design.md "One statement per kind"), then the others one after another in read order. If it fails for any reason, each of its requests goes again alone, in order,
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
takes; unexpected exceptions are retried ``QM_UNEXPECTED_ERROR_ATTEMPTS`` times with capped
backoff, then dead-lettered. A dead letter that cannot be built or written whole falls back to the
record's raw bytes and a minimal header set (``workers.dead_letters``), so every record settles.

What a collector hears: a reply only once the outcome is final. A request retried in place gets
its one reply when it finally succeeds. Bad input is final (replaying it fails the same way), so
it is answered ``request.invalid`` where a correlation id can be read. A request dead-lettered
after unexpected errors is answered ``request.failed`` (the error's class, no message): nothing of
it was done. Its dead letter may be replayed once the cause is fixed, and the reply it gets then
is its real answer (the SDK releases a grant that follows a ``request.failed``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog

from app.core import captures, jobs, seeds, sessions
from app.core.transaction import Route, Tx, TxServices
from app.crypto import SecretBox
from app.dlt import dlt_topic, header
from app.errors import (
    Disposition,
    InvalidMessage,
    classify,
    describe,
    error_class,
    unexpected_delay,
)
from app.health import REQUEST_SECONDS, REQUESTS
from app.settings import Settings
from app.store import Database, dlt_values, inbox
from schemas.messages import (
    CORRELATION_ID,
    AnyRequest,
    JobStart,
    RequestConflict,
    RequestFailed,
    RequestInvalid,
    parse_request,
)
from workers import dead_letters
from workers.consuming import Incoming
from workers.dead_letters import Letter, raw_letter, readable_ids
from workers.group_commit import GroupCommit
from workers.lenient_records import undecodable_header_names
from workers.reply_routes import ReplyRoutes, reply_partition
from workers.request_batches import apply_batched, send_reply
from workers.retrying import TransientRetry

log = structlog.get_logger()

Handler = Callable[[Tx, Any, Route], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[str, Handler] = {
    "job.start": jobs.start,
    "job.heartbeat": jobs.heartbeat,
    "job.finish": jobs.finish,
    "job.cancel": jobs.cancel,
    "session.upload": sessions.upload,
    "capture.submit": captures.submit,
    "seeds.claim": seeds.claim,
}


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
    def route(self) -> Route:
        """Where this request's answers go."""
        return Route(self.reply_to, self.correlation_id, self.reply_partition)

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self.route.headers


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
        self.services = TxServices(settings, secrets or SecretBox.from_settings(settings))
        self.routes = ReplyRoutes(settings)
        self._retry_transient = TransientRetry("worker", settings.transient_retry_max_seconds)
        self._group: GroupCommit[Pending] = GroupCommit(
            batch_max=settings.worker_batch_max,
            transactions=settings.worker_transactions,
            shared=lambda taken: self._transact([p.parsed for p in taken if p.parsed]),
            alone=lambda pending: self._process(pending.record),
            give_up=lambda pending, error, attempts: self._dead_letter_raw(
                pending.record, error, attempts
            ),
            attempts=settings.unexpected_error_attempts,
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
                return await self._settle_failed(record, exc, attempts, disposition)

    async def _settle_failed(
        self, record: Incoming, error: Exception, attempts: int, disposition: Disposition
    ) -> str:
        """Dead-letter a record that failed for good; when its full dead letter (or its reply)
        cannot be written, its raw one is, so the record settles all the same."""
        try:
            await self._retry_transient(
                partial(self._dead_letter, record, error, attempts, disposition)
            )
        except Exception as exc:  # noqa: BLE001 - a record is settled whatever it holds
            log.error(
                "dead_letter_failed",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error_class=type(exc).__name__,
            )
            return await self._dead_letter_raw(record, error, attempts)
        return "dead_lettered"

    def _parse(self, record: Incoming) -> Parsed:
        if undecodable := undecodable_header_names(record.headers):
            raise InvalidMessage(f"header names that are not UTF-8: {', '.join(undecodable)}")
        if record.value is None:
            raise InvalidMessage("the record's value is null")
        if len(record.value) > self.settings.max_request_bytes:
            raise InvalidMessage(
                f"request of {len(record.value)} bytes exceeds the limit of {self.settings.max_request_bytes}"
            )
        request = parse_request(record.value)
        reply_to = self.routes.checked_topic(record)
        correlation_id = header(record.headers, CORRELATION_ID) or str(request.request_id)
        if "\x00" in correlation_id:  # a job keeps it in a text column, which holds no NUL
            raise InvalidMessage("correlation_id must not contain the NUL character (U+0000)")
        return Parsed(
            request,
            reply_to,
            correlation_id,
            record.partition,
            record.offset,
            reply_partition(record),
            record.topic,
            record.timestamp_ms,
        )

    async def _handle(self, record: Incoming) -> str:
        [outcome] = await self._transact([self._parse(record)])
        return outcome

    async def _transact(self, requests: list[Parsed]) -> list[str]:
        """Apply ``requests`` in order in one transaction; their outcomes."""
        async with self.db.transaction() as conn:
            # the first locks of every transaction, alone or shared: the sites (lock order),
            # then the requests' inbox rows, in one statement
            claimed = await inbox.claim_requests(
                conn,
                [_claim(p) for p in requests],
                slugs=[p.request.site for p in requests if isinstance(p.request, JobStart)],
                job_ids=[p.request.job_id for p in requests if not isinstance(p.request, JobStart)],
            )
            tx = Tx(conn, self.services, locked_sites=claimed.sites, job_sites=claimed.job_sites)
            unseen = claimed.fresh
            batched = await apply_batched(tx, requests, unseen)
            for n, reply in sorted(batched.items()):  # in the order they were applied: first
                send_reply(tx, requests[n], reply)
            outcomes = []
            for n, parsed in enumerate(requests):
                if n in batched:
                    outcomes.append("replied")
                    continue
                # a request_id twice here: the first is new, then a repeat
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
        request = parsed.request
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
            reply = await handler(tx, request, parsed.route)
        send_reply(tx, parsed, reply)
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
        """The record to ``<topic>.dlt`` with its headers, and its collector's final answer
        where a correlation id can be read: ``request.invalid`` for bad input, else
        ``request.failed``."""
        message = describe(error)
        letter = dead_letters.letter(record, error, attempts, message, self.settings)
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            await self._add_letter(tx, record, letter)
            self._answer(tx, record, error, message, disposition)
            await tx.flush()
        self._log_dead_letter(record, error, attempts, letter)

    async def _dead_letter_raw(self, record: Incoming, error: BaseException, attempts: int) -> str:
        """The record's raw dead letter alone (``workers.dead_letters.raw_letter``): what is
        written when its full dead letter or its reply could not be."""
        letter = raw_letter(record, error, attempts, self.settings)

        async def write() -> None:
            async with self.db.transaction() as conn:
                tx = Tx(conn, self.services)
                await self._add_letter(tx, record, letter)
                await tx.flush()

        await self._retry_transient(write)
        self._log_dead_letter(record, error, attempts, letter)
        return "dead_lettered"

    async def _add_letter(self, tx: Tx, record: Incoming, letter: Letter) -> None:
        if letter.stored is not None:
            await dlt_values.store_value(tx.conn, letter.stored)
        tx.box.add(dlt_topic(record.topic), record.key, letter.value, letter.headers)

    def _log_dead_letter(
        self, record: Incoming, error: BaseException, attempts: int, letter: Letter
    ) -> None:
        log.warning(
            "request_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(error).__name__,
            attempts=attempts,
            value_ref=letter.stored.ref if letter.stored is not None else None,
        )

    def _answer(
        self,
        tx: Tx,
        record: Incoming,
        error: BaseException,
        message: str,
        disposition: Disposition,
    ) -> None:
        """The final answer to a dead-lettered request, where a correlation id can be read:
        ``request.invalid`` for bad input, ``request.failed`` (the error's class) otherwise."""
        ids = readable_ids(record.value)
        correlation_id = header(record.headers, CORRELATION_ID) or ids.get("request_id")
        if not correlation_id:
            return
        request_id, job_id = ids.get("request_id"), ids.get("job_id")
        answer = (
            RequestInvalid(request_id=request_id, job_id=job_id, error=message)
            if disposition is Disposition.INVALID
            else RequestFailed(request_id=request_id, job_id=job_id, error_class=error_class(error))
        )
        tx.box.add(
            self.routes.topic(record),
            job_id or record.key,
            answer.model_dump(mode="json"),
            [(CORRELATION_ID, correlation_id)],
            partition=self.routes.lenient_partition(record),
        )


def _count(record: Incoming, started: float, outcome: asyncio.Future[str]) -> None:
    if not outcome.cancelled():
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        REQUESTS.labels(_request_type(record.value), outcome.result()).inc()


def _request_type(raw: bytes | None) -> str:
    """The request's type for metrics; only known types, so labels stay bounded."""
    if raw is None:
        return "other"
    match = re.search(rb'"type"\s*:\s*"([a-z.]{1,32})"', raw[:4096])
    name = match.group(1).decode() if match else ""
    return name if name in HANDLERS else "other"
