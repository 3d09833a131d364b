"""Merging Playwright storage states the way a browser keeps cookies and storage.

An upload lands on the session already kept for the account:

- Cookies are one per key (name, domain, path), the domain compared as browsers compare a cookie's
  Domain attribute (case-insensitive, a leading dot ignored) and an empty path meaning ``/``. The
  uploaded cookie wins; cookies the upload lacks are kept, so a cookie that one login flow sets
  only once is not lost. An uploaded cookie whose ``expires`` lies in the past deletes the kept
  cookie with its key (that is how a site logs out); ``expires == -1`` is a session cookie and is
  kept. Kept cookies that have expired are dropped.
- Origins are one per origin. Their localStorage entries merge by name; in an upload marked as a
  full snapshot (``FULL_SNAPSHOT``), an origin's list replaces the kept one, so an empty list
  clears it. IndexedDB (and any other per-origin store Playwright records) is kept per origin, the
  uploaded one replacing the kept one when the upload has it. An origin left with no storage at
  all is dropped, as Playwright itself leaves it out.

Nothing here does I/O: the caller passes the database's clock as ``now`` (Unix seconds).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

State = dict[str, Any]
CookieKey = tuple[str, str, str]

FULL_SNAPSHOT = "full_snapshot"  # top-level flag of an upload: its origins are whole
SESSION_COOKIE_EXPIRES = (
    -1
)  # Playwright's ``expires`` of a cookie that lives as long as the browser
_ORIGIN_STORES_SKIPPED = frozenset({"origin", "localStorage"})


def cookie_key(cookie: dict[str, Any]) -> CookieKey:
    """The key under which a browser keeps ``cookie``: name, domain as compared, path."""
    domain = str(cookie.get("domain") or "").lower().removeprefix(".")
    return (str(cookie.get("name", "")), domain, str(cookie.get("path") or "/"))


def cookie_expired(cookie: dict[str, Any], now: float) -> bool:
    """True for a cookie whose ``expires`` lies at or before ``now``; session cookies never expire."""
    expires = cookie.get("expires", SESSION_COOKIE_EXPIRES)
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        return False
    return expires != SESSION_COOKIE_EXPIRES and expires <= now


def _dicts(state: State | None, field: str) -> list[dict[str, Any]]:
    items = (state or {}).get(field)
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _merge_cookies(kept: State | None, uploaded: State, now: float) -> list[dict[str, Any]]:
    cookies = {cookie_key(c): c for c in _dicts(kept, "cookies") if not cookie_expired(c, now)}
    for cookie in _dicts(uploaded, "cookies"):
        if cookie_expired(cookie, now):
            cookies.pop(cookie_key(cookie), None)  # a deletion, as a browser applies it
        else:
            cookies[cookie_key(cookie)] = cookie
    return [cookies[key] for key in sorted(cookies)]  # one order, whatever the uploads' order


def _local_storage(origin: dict[str, Any]) -> list[dict[str, Any]]:
    # an entry is kept by its name: one without a string name (an old upload's) is not an entry
    return [e for e in _dicts(origin, "localStorage") if isinstance(e.get("name"), str)]


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
    origins = {o["origin"]: o for o in _dicts(kept, "origins") if isinstance(o.get("origin"), str)}
    for origin in _dicts(uploaded, "origins"):
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
    cookies = len(_dicts(state, "cookies"))
    if cookies > max_cookies:
        return f"the session would hold {cookies} cookies; at most {max_cookies} are kept"
    size = state_bytes(state)
    if size > max_bytes:
        return f"the session would take {size} bytes; at most {max_bytes} are kept"
    return None


def browser_snapshot(started: State | None, current: State, *, indexed_db: bool = False) -> State:
    """The upload of a browser context that began from ``started`` and now holds ``current``.

    ``current`` is Playwright's ``storage_state()``, which leaves out what the browser dropped:
    a cookie the site deleted (or that expired) and an origin whose storage was cleared. So each
    cookie of ``started`` missing from ``current`` is sent with a past expiry (a deletion), each
    origin of ``started`` missing from it with an empty localStorage (and IndexedDB, when
    ``current`` recorded it: ``indexed_db``), and the upload is a full snapshot.
    """
    now_keys = {cookie_key(c) for c in _dicts(current, "cookies")}
    deleted = [
        {**c, "value": "", "expires": 0}
        for c in _dicts(started, "cookies")
        if cookie_key(c) not in now_keys
    ]
    now_origins = {o.get("origin") for o in _dicts(current, "origins")}
    empty: dict[str, list[Any]] = {"localStorage": []} | ({"indexedDB": []} if indexed_db else {})
    cleared = [
        {"origin": o["origin"], **empty}
        for o in _dicts(started, "origins")
        if isinstance(o.get("origin"), str) and o["origin"] not in now_origins
    ]
    return {
        "cookies": _dicts(current, "cookies") + deleted,
        "origins": _dicts(current, "origins") + cleared,
        FULL_SNAPSHOT: True,
    }


# --- shape ---------------------------------------------------------------------------------------

MAX_COOKIES = 10_000  # per upload; the session's own bound (QM_SESSION_MAX_COOKIES) is lower
MAX_ORIGINS = 1_000
MAX_ENTRIES = 10_000  # localStorage entries of one origin


class _Shape(BaseModel):
    # Playwright adds fields over time (partitionKey, indexedDB, ...): kept as they come
    model_config = ConfigDict(extra="allow", frozen=True)


class _Cookie(_Shape):
    name: StrictStr
    value: StrictStr
    domain: StrictStr | None = None
    path: StrictStr | None = None
    expires: StrictInt | StrictFloat | None = None
    httpOnly: StrictBool | None = None
    secure: StrictBool | None = None
    sameSite: StrictStr | None = None


class _Entry(_Shape):
    name: StrictStr
    value: StrictStr


class _Origin(_Shape):
    origin: StrictStr
    localStorage: Annotated[list[_Entry], Field(max_length=MAX_ENTRIES)] = []


class StorageState(_Shape):
    """A Playwright ``storage_state`` as a collector uploads it: cookies and origins with
    string names and values, in bounded numbers, and the ``full_snapshot`` flag."""

    cookies: Annotated[list[_Cookie], Field(max_length=MAX_COOKIES)] = []
    origins: Annotated[list[_Origin], Field(max_length=MAX_ORIGINS)] = []
    full_snapshot: StrictBool = False


def storage_state_problem(state: Any) -> str | None:
    """What is wrong with the shape of an uploaded storage state, or None when it is one.

    The answer names paths and rules only, never a name or value it holds.
    """
    if not isinstance(state, dict):
        return "a storage state is a JSON object"
    try:
        StorageState.model_validate(state)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in errors[:5]
        )
    return None
