"""Replaying a failed capture's dead letter: the capture is handed off again, or the replay says
why not.

A capture's dead letter on ``qm.captures.dlt`` holds the ``capture.handoff`` record that started
its last attempt. Sent back to ``qm.captures`` as it is, that record changes nothing: the handoff
worker claims RECEIVED captures only, and the capture is FAILED. So a replay does what
``qm captures retry`` does instead (``app.core.captures.retry``): FAILED -> RECEIVED, one
conditional UPDATE, with the record that starts its handoff written to the outbox and the ledger
row of the dead letter, all in one transaction: the ledger names a dead letter replayed only
when its capture was re-armed. A capture in any other state is left alone, and the replay
reports it as not replayed, with its status.
"""

from __future__ import annotations

import contextlib
import getpass
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from app.core.captures import retry
from app.core.transaction import Tx, TxServices
from app.dlt.reader import DeadLetter
from app.store import captures
from app.store.dlt_replays import ReplayedOffset, record_replays
from schemas.messages import CaptureHandoff

FAILED = "FAILED"
MISSING = "missing"  # the status shown for a capture the database does not have


@dataclass(frozen=True, slots=True)
class NotRearmed:
    """A capture's dead letter the replay left alone, and the capture's status then."""

    letter: DeadLetter
    capture_id: str
    status: str

    @property
    def reason(self) -> str:
        """One line for the operator."""
        if self.status == MISSING:
            return f"{self.letter.coordinates}: no capture {self.capture_id!r}"
        return (
            f"{self.letter.coordinates}: capture {self.capture_id} is {self.status}, not FAILED; "
            "nothing to hand off again"
        )


def capture_named(letter: DeadLetter, target: str, captures_topic: str) -> str | None:
    """The capture a dead letter bound for ``captures_topic`` hands off; None for any other
    letter (another target, or a record that is no ``capture.handoff``: that one is sent as is)."""
    if target != captures_topic or letter.value is None:
        return None
    try:
        return CaptureHandoff.model_validate_json(letter.value).capture_id
    except ValueError:
        return None


async def status_of(conn: AsyncConnection, capture_id: str) -> str:
    """The capture's status now, or ``missing``."""
    row = await captures.describe_capture(conn, capture_id)
    return MISSING if row is None else str(row["status"])


async def rearm(
    conn: AsyncConnection,
    services: TxServices,
    ledger_topic: str,
    letter: DeadLetter,
    capture_id: str,
    *,
    again: bool,
) -> str | None:
    """Hand the capture off again and record ``letter`` as replayed, in one transaction on
    ``conn`` (committed here); None when it was re-armed, else its status (nothing changed)."""
    settings = services.settings
    tx = Tx(conn, services)
    reason = f"replayed from {letter.coordinates} by operator {getpass.getuser()}"
    try:
        if await retry(tx, capture_id, reason) is None:
            status = await status_of(conn, capture_id)
            await conn.rollback()
            return status
        await tx.flush()
        row = ReplayedOffset(letter.partition, letter.offset, settings.topic("captures"))
        await record_replays(conn, ledger_topic, [row], again=again)
        await conn.commit()
        return None
    except BaseException:
        # the connection goes on recording the replay's acked copies: leave it usable
        with contextlib.suppress(Exception):
            await conn.rollback()
        raise
