"""Playwright storage states on the wire: their shape, the key of a cookie, and the snapshot a
browser context uploads (``browser_snapshot``). How an upload merges into a kept session is the
core's (``app.core.sessions``).
"""

from __future__ import annotations

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


def cookie_key(cookie: dict[str, Any]) -> CookieKey:
    """The key under which a browser keeps ``cookie``: name, domain as compared, path."""
    domain = str(cookie.get("domain") or "").lower().removeprefix(".")
    return (str(cookie.get("name", "")), domain, str(cookie.get("path") or "/"))


def state_items(state: State | None, field: str) -> list[dict[str, Any]]:
    """The dicts of ``state``'s list ``field`` (cookies or origins); anything else is skipped."""
    items = (state or {}).get(field)
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def browser_snapshot(started: State | None, current: State, *, indexed_db: bool = False) -> State:
    """The upload of a browser context that began from ``started`` and now holds ``current``.

    ``current`` is Playwright's ``storage_state()``, which leaves out what the browser dropped:
    a cookie the site deleted (or that expired) and an origin whose storage was cleared. So each
    cookie of ``started`` missing from ``current`` is sent with a past expiry (a deletion), each
    origin of ``started`` missing from it with an empty localStorage (and IndexedDB, when
    ``current`` recorded it: ``indexed_db``), and the upload is a full snapshot.
    """
    now_keys = {cookie_key(c) for c in state_items(current, "cookies")}
    deleted = [
        {**c, "value": "", "expires": 0}
        for c in state_items(started, "cookies")
        if cookie_key(c) not in now_keys
    ]
    now_origins = {o.get("origin") for o in state_items(current, "origins")}
    empty: dict[str, list[Any]] = {"localStorage": []} | ({"indexedDB": []} if indexed_db else {})
    cleared = [
        {"origin": o["origin"], **empty}
        for o in state_items(started, "origins")
        if isinstance(o.get("origin"), str) and o["origin"] not in now_origins
    ]
    return {
        "cookies": state_items(current, "cookies") + deleted,
        "origins": state_items(current, "origins") + cleared,
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
