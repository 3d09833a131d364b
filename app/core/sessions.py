"""Sessions: session.upload, the session state a job.finish carries, and how either merges into
the account's session.

Collectors send session states sealed to Quartermaster's ``upload_key`` (docs/security.md), so
neither the requests topic nor its dead-letter topic ever holds a cookie in the clear. They are
opened here, merged into the account's session and stored encrypted at rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog

from app.core import proxies
from app.core.replies import Reply
from app.core.transaction import Route, Tx
from app.lease_secrets import lease_secret_hash, matches
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
from schemas.sessions import (
    FULL_SNAPSHOT,
    SESSION_COOKIE_EXPIRES,
    State,
    cookie_key,
    state_items,
    storage_state_problem,
)

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


async def upload(tx: Tx, req: SessionUpload, route: Route) -> Reply:
    """Merge a collector's browser state into its account's session while it holds the lease."""
    try:
        uploaded = open_session_state(tx, req.storage_state, "session.upload", req.job_id)
    except Unsealable as exc:
        return RequestInvalid(
            request_id=str(req.request_id), job_id=req.job_id, error=f"storage_state: {exc}"
        ).model_dump(mode="json")
    secret_hash = lease_secret_hash(req.lease_secret)
    if req.proxy_failed:  # lock order: the site (locked with the request's claim), then accounts
        await tx.site_of_job(req.job_id)
    outcome = await merge_session(tx, req.job_id, req.lease_token, secret_hash, uploaded)
    if req.proxy_failed and (outcome.version is not None or outcome.refused is not None):
        # the lease is the holder's (the merge checked it); its site was locked first
        await proxies.report(tx, {"id": req.job_id, "lease_token": req.lease_token}, failed=True)
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


# --- merge -----------------------------------------------------------------------------------
# Playwright storage states merge the way a browser keeps cookies and storage. An upload lands on
# the session already kept for the account:
# An upload lands on the session already kept for the account:
#
# - Cookies are one per key (name, domain, path), the domain compared as browsers compare a cookie's
#   Domain attribute (case-insensitive, a leading dot ignored) and an empty path meaning ``/``. The
#   uploaded cookie wins; cookies the upload lacks are kept, so a cookie that one login flow sets
#   only once is not lost. An uploaded cookie whose ``expires`` lies in the past deletes the kept
#   cookie with its key (that is how a site logs out); ``expires == -1`` is a session cookie and is
#   kept. Kept cookies that have expired are dropped.
# - Origins are one per origin. Their localStorage entries merge by name; in an upload marked as a
#   full snapshot (``FULL_SNAPSHOT``), an origin's list replaces the kept one, so an empty list
#   clears it. IndexedDB (and any other per-origin store Playwright records) is kept per origin, the
#   uploaded one replacing the kept one when the upload has it. An origin left with no storage at
#   all is dropped, as Playwright itself leaves it out.
#
# Nothing here does I/O: the caller passes the database's clock as ``now`` (Unix seconds).

_ORIGIN_STORES_SKIPPED = frozenset({"origin", "localStorage"})


def cookie_expired(cookie: dict[str, Any], now: float) -> bool:
    """True for a cookie whose ``expires`` lies at or before ``now``; session cookies never expire."""
    expires = cookie.get("expires", SESSION_COOKIE_EXPIRES)
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        return False
    return expires != SESSION_COOKIE_EXPIRES and expires <= now


def _merge_cookies(kept: State | None, uploaded: State, now: float) -> list[dict[str, Any]]:
    cookies = {cookie_key(c): c for c in state_items(kept, "cookies") if not cookie_expired(c, now)}
    for cookie in state_items(uploaded, "cookies"):
        if cookie_expired(cookie, now):
            cookies.pop(cookie_key(cookie), None)  # a deletion, as a browser applies it
        else:
            cookies[cookie_key(cookie)] = cookie
    return [cookies[key] for key in sorted(cookies)]  # one order, whatever the uploads' order


def _local_storage(origin: dict[str, Any]) -> list[dict[str, Any]]:
    # an entry is kept by its name: one without a string name (an old upload's) is not an entry
    return [e for e in state_items(origin, "localStorage") if isinstance(e.get("name"), str)]


def _merge_origin(
    old: dict[str, Any] | None, new: dict[str, Any], full_snapshot: bool
) -> dict[str, Any]:
    if old is None or full_snapshot:
        entries = {e.get("name"): e for e in _local_storage(new)}
    else:
        entries = {e.get("name"): e for e in _local_storage(old)}
        entries.update((e.get("name"), e) for e in _local_storage(new))
    stores = {k: v for k, v in (old or {}).items() if k not in _ORIGIN_STORES_SKIPPED}
    stores.update((k, v) for k, v in new.items() if k not in _ORIGIN_STORES_SKIPPED)
    return {"origin": new["origin"], "localStorage": list(entries.values()), **stores}


def _has_storage(origin: dict[str, Any]) -> bool:
    return any(v for k, v in origin.items() if k != "origin")


def _merge_origins(kept: State | None, uploaded: State) -> list[dict[str, Any]]:
    full_snapshot = uploaded.get(FULL_SNAPSHOT) is True
    origins = {
        o["origin"]: o for o in state_items(kept, "origins") if isinstance(o.get("origin"), str)
    }
    for origin in state_items(uploaded, "origins"):
        if isinstance(origin.get("origin"), str):
            merged = _merge_origin(origins.get(origin["origin"]), origin, full_snapshot)
            origins[origin["origin"]] = merged
    return [o for o in origins.values() if _has_storage(o)]


def merge_storage_state(kept: State | None, uploaded: State, *, now: float) -> State:
    """The session after ``uploaded`` lands on ``kept`` (either may lack cookies or origins)."""
    return {
        "cookies": _merge_cookies(kept, uploaded, now),
        "origins": _merge_origins(kept, uploaded),
    }


def state_bytes(state: State) -> int:
    """The size of ``state`` as compact JSON, the measure of the session bound."""
    return len(json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode())


def session_too_large(state: State, *, max_cookies: int, max_bytes: int) -> str | None:
    """Why ``state`` is over the bounds of one session, or None when it fits.

    The reason names counts and sizes only, never a cookie's name or value.
    """
    cookies = len(state_items(state, "cookies"))
    if cookies > max_cookies:
        return f"the session would hold {cookies} cookies; at most {max_cookies} are kept"
    size = state_bytes(state)
    if size > max_bytes:
        return f"the session would take {size} bytes; at most {max_bytes} are kept"
    return None
