"""The session family: session.upload, and the session state a job.finish carries.

Collectors send session states sealed to Quartermaster's ``upload_key`` (docs/security.md), so
neither the requests topic nor its dead-letter topic ever holds a cookie in the clear. They are
opened here, merged into the account's session and stored encrypted at rest.
"""

from __future__ import annotations

import json
import re
from typing import Any

import structlog

from app.crypto import Unsealable
from app.leasing import Tx
from app.store import sessions
from schemas.messages import (
    JobLeaseLost,
    RequestInvalid,
    SessionMerged,
    SessionUpload,
    seal_context,
)
from schemas.sessions import merge_storage_state

log = structlog.get_logger()


def open_session_state(tx: Tx, sealed: str | None, field: str, job_id: str) -> Any:
    """A sealed session state opened with Quartermaster's keys (None stays None).

    Raises ``Unsealable`` when it does not open or is not a JSON object.
    """
    if sealed is None:
        return None
    state = tx.services.secrets.open_upload(sealed, seal_context(field, job_id))
    if not isinstance(state, dict):
        raise Unsealable("the sealed session state is not a JSON object")
    return state


async def merge_session(
    tx: Tx, job_id: str, lease_token: int, uploaded: dict[str, Any]
) -> int | None:
    """Merge ``uploaded`` into the session of the account the lease holds; the new version.

    None when the token holds no live lease on an account. The account row is locked by the
    read, and the write repeats the version it read, so no concurrent upload is lost.
    """
    held = await sessions.held_session(tx.conn, job_id, lease_token)
    if held is None:
        return None
    kept = (
        None
        if held["storage_state"] is None
        else tx.services.secrets.open_json(bytes(held["storage_state"]))
    )
    merged = merge_storage_state(kept, uploaded)
    version = await sessions.save_session(
        tx.conn, held["account_id"], tx.services.secrets.seal_json(merged), held["version"]
    )
    if version is not None:
        tx.events.emit(
            "session",
            "merged",
            id=str(held["account_id"]),
            site=held["site"],
            status=str(version),
            job_id=job_id,
        )
        log.info("session_merged", job_id=job_id, account_id=held["account_id"], version=version)
    return version


async def upload(tx: Tx, req: SessionUpload, reply_to: str, correlation_id: str) -> dict[str, Any]:
    """Merge a collector's browser state into its account's session while it holds the lease."""
    try:
        uploaded = open_session_state(tx, req.storage_state, "session.upload", req.job_id)
    except Unsealable as exc:
        return RequestInvalid(
            request_id=str(req.request_id), job_id=req.job_id, error=f"storage_state: {exc}"
        ).model_dump(mode="json")
    version = await merge_session(tx, req.job_id, req.lease_token, uploaded)
    if version is None:
        return JobLeaseLost(
            request_id=req.request_id, job_id=req.job_id, reason="no_live_lease"
        ).model_dump(mode="json")
    return SessionMerged(request_id=req.request_id, job_id=req.job_id, version=version).model_dump(
        mode="json"
    )


CLEAR_SESSION_FIELDS = ("storage_state", "session_state")
SEALED_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")  # base64: what a sealed box looks like
WITHHELD = "[withheld: a session state must travel sealed]"


def without_clear_sessions(raw: bytes) -> bytes:
    """A request record fit for a dead-letter topic: a session state sent in the clear (not a
    sealed string, as an old or broken collector might send) is replaced, so the dead letter
    never holds cookies. Anything else, sealed states included, is kept byte for byte."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw
    if not isinstance(body, dict):
        return raw
    clear = [
        name
        for name in CLEAR_SESSION_FIELDS
        if body.get(name) is not None
        and not (isinstance(body[name], str) and SEALED_TEXT.fullmatch(body[name]))
    ]
    if not clear:
        return raw
    return json.dumps({**body, **dict.fromkeys(clear, WITHHELD)}).encode()
