"""Rows the broker refuses for good: dead-lettered (or parked) so they never block their shard.

A row too large for any message is refused at once; any other refusal (a topic the broker's own
metadata says it does not have or will not take, a row the broker refuses when sent alone)
counts one try in ``outbox.attempts``, and at ``outbox_max_attempts`` the row is given up. No
answer is no refusal: a metadata or request time-out, a broker away, a leader being elected
spend no try, whatever their number (``app.outbox.topics``, ``definite``); the rows wait. A given-up row is rewritten in place, by one
conditional UPDATE, into a dead letter on ``<prefix>outbox.dlt``: the original headers, then
``qm.dlt.original_topic`` (where it was going), ``qm.dlt.outbox_id`` and the failure's headers; a
value too large for the dead letter moves to ``dlt_values``. A dead letter that is refused for
good itself has nowhere to go: it is parked (``parked_at``), counted and logged.
"""

from __future__ import annotations

import structlog
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RequestTimedOutError,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from app.dlt.letter_headers import failure_headers, value_ref_headers
from app.outbox import metrics
from app.outbox.relay_rounds import Outcome, message_size, record_size
from app.settings import Settings
from app.store.dlt_values import StoredValue
from app.store.outbox import UnsentRow, count_failures, dead_letter_row, park_rows

log = structlog.get_logger()

DLT_SUFFIX = ".dlt"


def definite(exc: KafkaError) -> bool:
    """Whether a failed send is the broker's refusal, not a failure to hear from it in time
    (aiokafka's own time-out is not marked retriable, yet it is no answer at all)."""
    return not (exc.retriable or isinstance(exc, KafkaTimeoutError | RequestTimedOutError))


async def settle_refusals(
    session: AsyncConnection, settings: Settings, outcome: Outcome
) -> tuple[int, int]:
    """Count the refused rows' tries; dead-letter (or park) those refused for good. Returns how
    many rows were dead-lettered and how many parked."""
    tries = await count_failures(session, [row.id for row, _ in outcome.refused])
    given_up: list[tuple[UnsentRow, BaseException, int]] = [
        (row, exc, tries[row.id])
        for row, exc in outcome.refused
        if tries.get(row.id, 0) >= settings.outbox_max_attempts
    ]
    given_up += [
        (row, MessageSizeTooLargeError(f"{message_size(row)} bytes"), row.attempts + 1)
        for row in outcome.too_large
    ]
    dead = parked = 0
    for row, exc, attempts in given_up:
        if row.topic.endswith(DLT_SUFFIX):
            parked += await _park(session, row, exc, attempts)
        elif await _dead_letter(session, settings, row, exc, attempts):
            dead += 1
    return dead, parked


async def _park(session: AsyncConnection, row: UnsentRow, exc: BaseException, attempts: int) -> int:
    done = len(await park_rows(session, [row.id]))
    if done:
        metrics.PARKED.inc()
        log.error("outbox_row_parked", outbox_id=row.id, topic=row.topic, shard=row.shard,
                  error_class=type(exc).__name__, attempts=attempts)  # fmt: skip
    return done


async def _dead_letter(
    session: AsyncConnection,
    settings: Settings,
    row: UnsentRow,
    exc: BaseException,
    attempts: int,
) -> bool:
    """Rewrite ``row`` as a dead letter on the outbox's dead-letter topic."""
    name = type(exc).__name__
    where = {"original_topic": row.topic, "outbox_id": str(row.id)}
    if row.partition is not None:  # a reply routed to its client's partition: `qm outbox retry`
        where["original_partition"] = str(row.partition)  # sends it back there
    headers = failure_headers(row.headers, where, exc, attempts, message=f"{name}: {exc}")
    stored = None
    if row.payload is not None and (
        record_size(row.key, row.payload, headers) > settings.dlt_inline_max_bytes
    ):
        stored = StoredValue.of(row.payload)
        headers += value_ref_headers(stored.ref, row.payload)
    target = settings.topic("outbox" + DLT_SUFFIX)
    done = await dead_letter_row(session, row, target, headers, stored)
    if done:
        metrics.DEAD_LETTERED.labels(name).inc()
        log.error("outbox_row_dead_lettered", outbox_id=row.id, topic=row.topic, shard=row.shard,
                  dead_letter_topic=target, error_class=name, attempts=attempts,
                  value_ref=stored.ref if stored else None)  # fmt: skip
    return done
