"""What a capture's transitions publish, through the caller's transaction's outbox (rule 5):
the record that starts an attempt, ``capture.ready`` with its event, a failure's dead letter, an
operator's retry."""

from __future__ import annotations

from typing import Any

import structlog

from app.dlt import Origin, dead_letter_headers, dlt_topic
from app.leasing import Tx
from app.store import Row, captures
from schemas.messages import CaptureHandoff, CaptureReady

log = structlog.get_logger()


class HandoffFailed(Exception):
    """The error class a failed capture's dead letter names (its message is the reason)."""


def dispatch(tx: Tx, capture_id: str) -> bytes:
    """The record on ``qm.captures`` that starts the capture's next handoff attempt; its value."""
    value = CaptureHandoff(capture_id=capture_id).model_dump_json().encode()
    tx.box.add(tx.settings.topic("captures"), capture_id, value)
    return value


async def retry(tx: Tx, capture_id: str, reason: str) -> Row | None:
    """FAILED -> RECEIVED from its first attempt, with the record that starts the handoff and a
    ``capture.retried`` event giving ``reason``; None (nothing changed) if it is not FAILED.

    The one way a failed capture is handed off again: ``qm captures retry`` and ``qm dlt replay``
    of its dead letter both come here."""
    row = await captures.retry_failed(tx.conn, capture_id)
    if row is None:
        return None
    dispatch(tx, capture_id)
    tx.events.emit(
        "capture",
        "retried",
        id=capture_id,
        site=row["site"],
        status=str(row["status"]),
        job_id=row["job_id"],
        reason=reason,
    )
    return row


def capture_fields(capture: Row) -> dict[str, Any]:
    """The capture as every downstream sees it (``capture.ready`` and each target's delivery)."""
    return {
        "capture_id": capture["id"],
        "job_id": capture["job_id"],
        "site": capture["site"],
        "url": capture["url"],
        "storage_uri": capture["storage_uri"],
        "sha256": capture["sha256"],
        "content_type": capture["content_type"],
        "size": capture["size"],
        "captured_at": capture["captured_at"],
    }


def ready(tx: Tx, capture: Row) -> None:
    """``capture.ready`` on ``qm.captures.ready`` and the ``capture.handed_off`` event."""
    message = CaptureReady(
        **capture_fields(capture),
        handed_off_at=capture["handed_off_at"],
        meta=capture["meta"] or None,
    )
    tx.box.add(
        tx.settings.topic("captures.ready"),
        capture["id"],
        message.model_dump(mode="json", exclude_none=True),
    )
    tx.events.capture("handed_off", capture)


def failed(tx: Tx, capture: Row, origin: Origin, headers: list[tuple[str, bytes | None]]) -> None:
    """A capture that ended FAILED: its terminal event, and a dead letter on
    ``qm.captures.dlt`` carrying its handoff record and the ``qm.dlt.*`` headers."""
    tx.events.capture("failed", capture)
    value = CaptureHandoff(capture_id=capture["id"]).model_dump_json().encode()
    tx.box.add(
        dlt_topic(tx.settings.topic("captures")),
        capture["id"],
        value,
        dead_letter_headers(
            headers,
            origin,
            HandoffFailed(capture["last_error"]),
            capture["attempts"],
            failed_at=capture["failed_at"],
        ),
    )
    log.warning(
        "capture_dead_lettered",
        capture_id=capture["id"],
        attempts=capture["attempts"],
        reason=capture["last_error"],
    )
