"""Captures: capture.submit (the capture row, its ``capture.accepted`` and its handoff record
commit together, rule 5), the record that dispatches each handoff attempt, and its outcome."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import structlog

from app.core.replies import Reply, lease_lost_reply, why_lease_lost
from app.core.transaction import Route, Tx
from app.crypto import SecretBox
from app.dlt import Origin, dead_letter_headers, dlt_topic, redact
from app.handoff.base import Delivery, TargetError
from app.lease_secrets import lease_secret_hash
from app.store import Row, captures, domains, jobs
from schemas.messages import (
    CaptureAccepted,
    CaptureHandoff,
    CaptureReady,
    CaptureSubmit,
    RequestConflict,
)
from schemas.states import CaptureStatus

log = structlog.get_logger()

# What makes two submissions the same capture (request_id, lease_token and lease_secret do not).
_BODY = {"job_id", "capture_id", "url", "storage_uri", "sha256", "content_type", "size"}


def capture_fingerprint(req: CaptureSubmit) -> str:
    """Hash of the capture's body as submitted: equal captures, equal fingerprints."""
    body = req.model_dump(mode="json", include=_BODY)
    body["captured_at"] = req.captured_at.isoformat()
    body["meta"] = req.meta or {}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


async def submit(tx: Tx, req: CaptureSubmit, route: Route) -> Reply:
    """Row a capture for the holder of the job's live lease and dispatch its handoff.

    The same capture again is accepted again (and changes nothing); the same ``capture_id``
    with another body is a conflict; a stale token or a wrong secret gets ``job.lease_lost``.
    The capture is added first, fenced by the lease in its statement: a capture that is new and
    a lease that is live, the usual case, cost no read before it. Only when it was not added is
    it read why (it exists, or the lease is not live).
    """
    fingerprint = capture_fingerprint(req)
    site = tx.job_sites.get(req.job_id)  # the job's site, locked first; None: no such job
    if site is not None and await _add(tx, req, site, fingerprint) is not None:
        return _accepted(req)
    # not added: it exists already (a concurrent submission of the same capture_id may have
    # committed first: the insert waited for it), or the lease is not live (the fence waited
    # for a finish, cancel or expiry in flight and then refused)
    existing = await captures.describe_capture(tx.conn, req.capture_id)
    if existing is None:
        job = await jobs.describe_job(tx.conn, req.job_id)
        return _lease_lost(req, why_lease_lost(job, req.lease_token, req.lease_secret))
    if existing["fingerprint"] != fingerprint:
        log.info("capture_conflict", capture_id=req.capture_id, job_id=req.job_id)
        return RequestConflict(request_id=req.request_id, job_id=req.job_id).model_dump(mode="json")
    return _accepted(req)


async def _add(tx: Tx, req: CaptureSubmit, site: str, fingerprint: str) -> Row | None:
    """The capture row (fenced by the job's live lease), its event and its handoff record; the
    rewrite rules its URL went through count a use only when the capture is added."""
    rewritten = await domains.plan_rewrites(tx.conn, site, [req.url])
    capture = await captures.add_capture(
        tx.conn,
        capture_id=req.capture_id,
        job_id=req.job_id,
        lease_token=req.lease_token,
        secret_hash=lease_secret_hash(req.lease_secret),
        url=rewritten.urls[0],
        storage_uri=req.storage_uri,
        sha256=req.sha256,
        content_type=req.content_type,
        size=req.size,
        captured_at=req.captured_at,
        meta=req.meta or {},
        fingerprint=fingerprint,
    )
    if capture is not None:
        await domains.record_uses(tx.conn, rewritten)
        dispatch(tx, capture["id"])
        tx.events.capture("received", capture)
        log.info("capture_received", capture_id=capture["id"], job_id=req.job_id)
    return capture


def _accepted(req: CaptureSubmit) -> dict[str, Any]:
    return CaptureAccepted(
        request_id=req.request_id, job_id=req.job_id, capture_id=req.capture_id
    ).model_dump(mode="json")


def _lease_lost(req: CaptureSubmit, reason: str) -> dict[str, Any]:
    log.info("capture_refused", capture_id=req.capture_id, job_id=req.job_id, reason=reason)
    return lease_lost_reply(req, reason)


class HandoffFailed(Exception):
    """The error class a failed capture's dead letter names (its message is the reason)."""


# named in its dead letters' qm.dlt.error_class header as it was published (operators filter on it)
HandoffFailed.__module__ = "app.handoff.records"


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


def capture_identity(capture: Row) -> dict[str, Any]:
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
        **capture_identity(capture),
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


def delivery_of(capture: Row, secrets: SecretBox) -> Delivery:
    """What the targets are handed for a claimed capture (this is attempt ``attempts + 1``);
    the site's webhook URL is opened here, just before it is called."""
    sealed = capture["webhook_sealed"]
    return Delivery(
        **capture_identity(capture),
        meta=dict(capture["meta"] or {}),
        attempt=capture["attempts"] + 1,
        dag_id=capture["dag_id"],
        webhook_url=None if sealed is None else secrets.open(bytes(sealed)),
    )


async def reclaim(tx: Tx, stale: Row, now: datetime | None = None) -> Row | None:
    """A handoff whose worker went silent: dispatched again, or FAILED (with its dead letter) at
    the attempt cap. None when it was finalised, or reaped elsewhere, since ``stale`` was read."""
    settings = tx.settings
    capture = await captures.reclaim_lapsed_handoff(
        tx.conn,
        stale["id"],
        stale["handoff_token"],
        max_attempts=settings.handoff_max_attempts,
        now=now,
    )
    if capture is None:
        return None
    if capture["status"] == CaptureStatus.FAILED:
        origin = Origin(settings.topic("captures"), -1, -1, 0, settings.handoff_consumer_group)
        failed(tx, capture, origin, [])
    else:
        dispatch(tx, capture["id"])
        tx.events.capture("reclaimed", capture)
    return capture


async def redispatch(tx: Tx, due: Row, now: datetime | None = None) -> Row | None:
    """A capture whose handoff record never reached a worker: its record on ``qm.captures``
    again. None when it was dispatched since ``due`` was read."""
    redispatch_seconds = tx.settings.handoff_redispatch_seconds
    capture = await captures.mark_dispatched(
        tx.conn, due["id"], redispatch_seconds=redispatch_seconds, now=now
    )
    if capture is not None:
        dispatch(tx, capture["id"])
    return capture


async def finish_handoffs(tx: Tx, claims: Sequence[tuple[str, int]]) -> dict[str, Row]:
    """Attempts that succeeded, together: HANDING_OFF -> HANDED_OFF with ``capture.ready`` for
    each (capture id, token) still the capture's. The captures that changed, by id."""
    done = await captures.finish_handoffs(tx.conn, claims)
    for capture in done:
        ready(tx, capture)
    return {capture["id"]: capture for capture in done}


async def settle_handoff(
    tx: Tx,
    capture_id: str,
    token: int,
    error: TargetError | None,
    origin: Origin,
    headers: list[tuple[str, bytes | None]],
    now: datetime | None = None,
) -> Row | None:
    """A handoff attempt's outcome: HANDING_OFF -> HANDED_OFF with ``capture.ready``; on
    ``error``, back to RECEIVED for another attempt or FAILED with its dead letter (read at
    ``origin`` with ``headers``). None when the attempt's token is no longer the capture's."""
    if error is None:
        done = await captures.finish_handoff(tx.conn, capture_id, token, now)
        if done is not None:
            ready(tx, done)
        return done
    settings = tx.settings
    done = await captures.give_back_handoff(
        tx.conn,
        capture_id,
        token,
        reason=redact(error.reason, 500),
        retryable=error.retryable,
        max_attempts=settings.handoff_max_attempts,
        backoff_base=settings.handoff_backoff_seconds,
        backoff_max=settings.handoff_backoff_max_seconds,
        now=now,
    )
    if done is not None and done["status"] == CaptureStatus.FAILED:
        failed(tx, done, origin, headers)
    elif done is not None:
        tx.events.capture("retrying", done)
    return done
