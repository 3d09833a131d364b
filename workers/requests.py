"""The claim worker's core: one request, one transaction (inbox + transition + outbox reply).

Failures follow one classification (``app.errors``): invalid input is dead-lettered at once with a
``request.invalid`` reply; transient infrastructure errors are retried in place for as long as it
takes; unexpected exceptions are retried a few times, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog

from app.crypto import SecretBox
from app.dlt import Origin, dead_letter_headers, dlt_topic, header, redact
from app.errors import Disposition, InvalidMessage, classify, describe
from app.health import REQUEST_SECONDS, REQUESTS, set_ready
from app.leasing import Services, Tx
from app.settings import Settings
from app.store import Database, inbox
from schemas.messages import (
    CORRELATION_ID,
    REPLY_TO,
    AnyRequest,
    RequestConflict,
    RequestInvalid,
    parse_request,
)
from workers import jobs, sessions

log = structlog.get_logger()
T = TypeVar("T")

Handler = Callable[[Tx, Any, str, str], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[str, Handler] = {
    "job.start": jobs.start,
    "job.heartbeat": jobs.heartbeat,
    "job.finish": jobs.finish,
    "job.cancel": jobs.cancel,
    "session.upload": sessions.upload,
}
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class Incoming:
    """A record as read from Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def fingerprint(request: AnyRequest) -> str:
    """Hash of the request's canonical JSON: equal bodies, equal fingerprints."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


class RequestProcessor:
    """Processes one request record at a time; ``process`` never raises for a bad record."""

    def __init__(self, settings: Settings, db: Database, secrets: SecretBox | None = None) -> None:
        self.settings = settings
        self.db = db
        self.services = Services(settings, secrets or SecretBox.from_settings(settings))
        self.ready = True

    async def process(self, record: Incoming) -> str:
        """Handle a record; returns what happened (replied, duplicate, conflict, dead_lettered)."""
        started = time.perf_counter()
        outcome = await self._process(record)
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        REQUESTS.labels(_request_type(record.value), outcome).inc()
        return outcome

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
                    log.warning(
                        "request_failed_retrying", error_class=type(exc).__name__, attempts=attempts
                    )
                    continue
                await self._retry_transient(partial(self._dead_letter, record, exc, attempts))
                return "dead_lettered"

    async def _retry_transient(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step``, retrying transient failures in place with capped backoff, never skipping."""
        delay = 0.05
        while True:
            try:
                result = await step()
            except Exception as exc:
                if classify(exc) is not Disposition.TRANSIENT:
                    raise
                self.ready = False
                set_ready("worker", False)
                log.warning("transient_error", error_class=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.transient_retry_max_seconds)
                continue
            if not self.ready:
                self.ready = True
                set_ready("worker", True)
            return result

    def _reply_to(self, record: Incoming) -> str:
        wanted = header(record.headers, REPLY_TO)
        if wanted and TOPIC_NAME.match(wanted):
            return wanted
        return self.settings.topic("replies")

    async def _handle(self, record: Incoming) -> str:
        if len(record.value) > self.settings.max_request_bytes:
            raise InvalidMessage(
                f"request of {len(record.value)} bytes exceeds the limit of {self.settings.max_request_bytes}"
            )
        request = parse_request(record.value)
        reply_to = self._reply_to(record)
        correlation_id = header(record.headers, CORRELATION_ID) or str(request.request_id)
        headers = [(CORRELATION_ID, correlation_id)]
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            request_id = str(request.request_id)
            fresh = await inbox.claim_request(
                conn,
                request_id=request_id,
                job_id=request.job_id,
                request_type=request.type,
                fingerprint=fingerprint(request),
            )
            if fresh:
                outcome = "replied"
                handler = HANDLERS.get(request.type)
                if handler is None:
                    reply: dict[str, Any] | None = RequestInvalid(
                        request_id=request_id,
                        job_id=request.job_id,
                        error=f"{request.type} is not served by this version",
                    ).model_dump(mode="json")
                else:
                    reply = await handler(tx, request, reply_to, correlation_id)
                if reply is not None:
                    tx.box.add(reply_to, request.job_id, reply, headers)
                    tx.box.keep_reply(request_id, reply_to, reply)
            else:
                outcome = await self._answer_again(tx, request, reply_to, headers)
            await tx.flush()
            self._fault("mid_transaction", request.job_id)
        self._fault("after_commit", request.job_id)
        log.debug(
            "request_processed", request_id=request_id, job_id=request.job_id, outcome=outcome
        )
        return outcome

    def _fault(self, point: str, job_id: str) -> None:
        """Chaos testing: die here, as a crash would, when the settings ask for it."""
        if self.settings.fault_point == point and self.settings.fault_job_id == job_id:
            log.warning("fault_injected", point=point, job_id=job_id)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _answer_again(
        self, tx: Tx, request: AnyRequest, reply_to: str, headers: list[tuple[str, str]]
    ) -> str:
        """A request_id seen before: the same body gets the same reply, another body a conflict."""
        seen = await inbox.seen_request(tx.conn, str(request.request_id))
        assert seen is not None
        if seen["fingerprint"] != fingerprint(request):
            conflict = RequestConflict(request_id=request.request_id, job_id=request.job_id)
            tx.box.add(reply_to, request.job_id, conflict.model_dump(mode="json"), headers)
            log.info("request_conflict", request_id=str(request.request_id), job_id=request.job_id)
            return "conflict"
        kept = tx.box.kept_reply(str(request.request_id))  # answered earlier in this transaction
        if kept is not None:
            tx.box.add(kept.topic, request.job_id, kept.reply, headers)
        elif seen["reply"] is not None:
            tx.box.add(seen["reply_topic"], request.job_id, seen["reply"], headers)
        return "duplicate"

    async def _dead_letter(self, record: Incoming, error: BaseException, attempts: int) -> None:
        """The record to ``<topic>.dlt`` with its headers, plus request.invalid where answerable."""
        message = redact(describe(error))
        origin = Origin(
            record.topic,
            record.partition,
            record.offset,
            record.timestamp_ms,
            self.settings.consumer_group,
        )
        ids = _readable_ids(record.value)
        correlation_id = header(record.headers, CORRELATION_ID) or ids.get("request_id")
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            tx.box.add(
                dlt_topic(record.topic),
                record.key,
                record.value,
                dead_letter_headers(record.headers, origin, error, attempts, message=message),
            )
            if correlation_id:
                invalid = RequestInvalid(
                    request_id=ids.get("request_id"), job_id=ids.get("job_id"), error=message
                )
                key = ids.get("job_id") or record.key
                tx.box.add(
                    self._reply_to(record),
                    key,
                    invalid.model_dump(mode="json"),
                    [(CORRELATION_ID, correlation_id)],
                )
            await tx.flush()
        log.warning(
            "request_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(error).__name__,
            attempts=attempts,
        )


def _request_type(raw: bytes) -> str:
    """The request's type for metrics; only known types, so labels stay bounded."""
    match = re.search(rb'"type"\s*:\s*"([a-z.]{1,32})"', raw[:4096])
    name = match.group(1).decode() if match else ""
    return name if name in HANDLERS else "other"


def _readable_ids(raw: bytes) -> dict[str, str]:
    """request_id and job_id of a bad record, when they can be read as short strings."""
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
