"""The session family: session.upload, and the session state a job.finish carries.

Collectors send session states sealed to Quartermaster's ``upload_key`` (docs/security.md), so
neither the requests topic nor its dead-letter topic ever holds a cookie in the clear. They are
opened here, merged into the account's session and stored encrypted at rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import structlog

from app.lease_secrets import lease_secret_hash, matches
from app.leasing import Tx
from app.sealing import Unsealable
from app.store import jobs, sessions
from schemas.messages import (
    JobLeaseLost,
    RequestInvalid,
    SessionMerged,
    SessionRejected,
    SessionUpload,
    seal_context,
)
from schemas.sessions import merge_storage_state, session_too_large, storage_state_problem

log = structlog.get_logger()


def open_session_state(tx: Tx, sealed: str | None, field: str, job_id: str) -> Any:
    """A sealed session state opened with Quartermaster's keys (None stays None).

    Raises ``Unsealable`` when it does not open or is not a storage state (its shape is checked
    here, before any merge reads it, so a malformed one is bad input).
    """
    if sealed is None:
        return None
    state = tx.services.secrets.open_upload(sealed, seal_context(field, job_id))
    if not isinstance(state, dict):
        raise Unsealable("the sealed session state is not a JSON object")
    if (problem := storage_state_problem(state)) is not None:
        raise Unsealable(f"the sealed session state is not a storage state: {problem}")
    return state


@dataclass(frozen=True)
class MergeOutcome:
    """What became of an upload: the session's new version, or why it was not kept.

    ``version`` and ``refused`` are both None when the token holds no live lease.
    """

    version: int | None = None
    refused: str | None = None


async def merge_session(
    tx: Tx, job_id: str, lease_token: int, secret_hash: bytes | None, uploaded: dict[str, Any]
) -> MergeOutcome:
    """Merge ``uploaded`` into the session of the account the lease holds (its token and the
    hash of its secret), within the bounds.

    The account row is locked by the read, and the write repeats the version it read, so no
    concurrent upload is lost. Cookies expire by the database's clock.
    """
    held = await sessions.held_session(tx.conn, job_id, lease_token, secret_hash)
    if held is None:
        return MergeOutcome()
    secrets = tx.services.secrets
    kept = (
        None if held["storage_state"] is None else secrets.open_json(bytes(held["storage_state"]))
    )
    merged = merge_storage_state(kept, uploaded, now=float(held["now_epoch"]))
    refused = session_too_large(
        merged,
        max_cookies=tx.settings.session_max_cookies,
        max_bytes=tx.settings.session_max_bytes,
    )
    if refused is not None:
        _emit(tx, held, "rejected", "session_too_large", job_id)
        log.warning("session_rejected", job_id=job_id, account_id=held["account_id"], why=refused)
        return MergeOutcome(refused=refused)
    version = await sessions.save_session(
        tx.conn, held["account_id"], secrets.seal_json(merged), held["version"]
    )
    if version is not None:
        _emit(tx, held, "merged", str(version), job_id)
        log.info("session_merged", job_id=job_id, account_id=held["account_id"], version=version)
    return MergeOutcome(version=version)


def _emit(tx: Tx, held: Any, what: str, status: str, job_id: str) -> None:
    tx.events.emit(
        "session", what, id=str(held["account_id"]), site=held["site"], status=status, job_id=job_id
    )


async def upload(tx: Tx, req: SessionUpload, reply_to: str, correlation_id: str) -> dict[str, Any]:
    """Merge a collector's browser state into its account's session while it holds the lease."""
    try:
        uploaded = open_session_state(tx, req.storage_state, "session.upload", req.job_id)
    except Unsealable as exc:
        return RequestInvalid(
            request_id=str(req.request_id), job_id=req.job_id, error=f"storage_state: {exc}"
        ).model_dump(mode="json")
    secret_hash = lease_secret_hash(req.lease_secret)
    outcome = await merge_session(tx, req.job_id, req.lease_token, secret_hash, uploaded)
    if outcome.refused is not None:
        return SessionRejected(
            request_id=req.request_id,
            job_id=req.job_id,
            reason="session_too_large",
            detail=outcome.refused,
        ).model_dump(mode="json")
    if outcome.version is None:
        return JobLeaseLost(
            request_id=req.request_id, job_id=req.job_id, reason=await _why_refused(tx, req)
        ).model_dump(mode="json")
    return SessionMerged(
        request_id=req.request_id, job_id=req.job_id, version=outcome.version
    ).model_dump(mode="json")


async def _why_refused(tx: Tx, req: SessionUpload) -> str:
    """``wrong_secret`` when the upload named the live lease's token with another secret;
    ``no_live_lease`` otherwise (its lease is gone, or it holds no account)."""
    job = await jobs.describe_job(tx.conn, req.job_id)
    wrong_secret = (
        job is not None
        and job["status"] == "RUNNING"
        and job["lease_token"] == req.lease_token
        and not matches(job["lease_secret_hash"], req.lease_secret)
    )
    if wrong_secret:
        log.info("upload_refused", job_id=req.job_id, reason="wrong_secret")
        return "wrong_secret"
    return "no_live_lease"


CLEAR_SESSION_FIELDS = ("storage_state", "session_state")
SEALED_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")  # base64: what a sealed box looks like
WITHHELD = "[withheld: a session state must travel sealed]"


def without_clear_sessions(raw: bytes) -> bytes:
    """A request record fit for a dead-letter topic: a session state sent in the clear (not a
    sealed string, as an old or broken collector might send) is replaced, so the dead letter
    never holds cookies. Anything else, sealed states included, is kept byte for byte."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # not a request: kept as it came
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
