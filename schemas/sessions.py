"""Merging Playwright storage states: what a new upload adds to the session already kept.

Cookies are one per (name, domain, path): the uploaded one wins, the others are kept, so a cookie
that a single login flow sets once is not lost when a later upload lacks it. Origins are one per
origin; their localStorage entries merge the same way by name.
"""

from __future__ import annotations

from typing import Any

State = dict[str, Any]


def _cookie_key(cookie: dict[str, Any]) -> tuple[str, str, str]:
    return (
        str(cookie.get("name", "")),
        str(cookie.get("domain", "")),
        str(cookie.get("path", "/")),
    )


def _merge_by(old: list[Any], new: list[Any], key: Any) -> list[Any]:
    merged = {key(item): item for item in old if isinstance(item, dict)}
    merged.update((key(item), item) for item in new if isinstance(item, dict))
    return list(merged.values())


def _merge_origin(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    storage = _merge_by(
        old.get("localStorage", []), new.get("localStorage", []), lambda e: e.get("name")
    )
    return {**old, **new, "localStorage": storage}


def merge_storage_state(kept: State | None, uploaded: State) -> State:
    """The session after ``uploaded`` lands on ``kept`` (either may lack cookies or origins)."""
    if not kept:
        return {
            "cookies": list(uploaded.get("cookies", [])),
            "origins": list(uploaded.get("origins", [])),
        }
    cookies = _merge_by(kept.get("cookies", []), uploaded.get("cookies", []), _cookie_key)
    origins: dict[str, dict[str, Any]] = {
        o["origin"]: o for o in kept.get("origins", []) if isinstance(o, dict) and "origin" in o
    }
    for origin in uploaded.get("origins", []):
        if isinstance(origin, dict) and "origin" in origin:
            before = origins.get(origin["origin"])
            origins[origin["origin"]] = _merge_origin(before, origin) if before else origin
    return {"cookies": cookies, "origins": list(origins.values())}
