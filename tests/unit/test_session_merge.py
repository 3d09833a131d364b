"""The merge rules of sessions: one test per rule, then properties over generated states."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.sessions import merge_storage_state, session_too_large
from schemas.sessions import (
    FULL_SNAPSHOT,
    MAX_COOKIES,
    browser_snapshot,
    cookie_key,
    storage_state_problem,
)

NOW = 1_800_000_000.0


def cookie(
    name: str, value: str, domain: str = ".board.example.com", path: str = "/", expires: float = -1
) -> dict[str, Any]:
    return {"name": name, "value": value, "domain": domain, "path": path, "expires": expires}


def values(state: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(c["name"], c["domain"]): c["value"] for c in state["cookies"]}


def storage(state: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        o["origin"]: {e["name"]: e["value"] for e in o["localStorage"]} for o in state["origins"]
    }


def origin(url: str, **entries: str) -> dict[str, Any]:
    return {"origin": url, "localStorage": [{"name": k, "value": v} for k, v in entries.items()]}


def test_an_upload_keeps_cookies_it_lacks_and_overrides_those_it_has() -> None:
    kept = {"cookies": [cookie("sid", "old"), cookie("login_once", "x")], "origins": []}
    uploaded = {"cookies": [cookie("sid", "new"), cookie("sid", "other", domain="cdn.example.com")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert values(merged) == {
        ("sid", ".board.example.com"): "new",
        ("login_once", ".board.example.com"): "x",
        ("sid", "cdn.example.com"): "other",
    }


def test_an_uploaded_cookie_with_a_past_expiry_deletes_the_kept_one() -> None:
    kept = {"cookies": [cookie("sid", "live", expires=NOW + 3600), cookie("theme", "dark")]}
    uploaded = {"cookies": [cookie("sid", "", expires=NOW - 1)]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert values(merged) == {("theme", ".board.example.com"): "dark"}


def test_a_session_cookie_is_kept_and_never_counts_as_expired() -> None:
    kept = {"cookies": [cookie("sid", "kept", expires=-1)]}
    uploaded = {"cookies": [cookie("csrf", "new", expires=-1)]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert values(merged) == {
        ("sid", ".board.example.com"): "kept",
        ("csrf", ".board.example.com"): "new",
    }


def test_kept_cookies_that_have_expired_are_dropped() -> None:
    kept = {
        "cookies": [cookie("old", "x", expires=NOW - 60), cookie("fresh", "y", expires=NOW + 60)]
    }
    merged = merge_storage_state(kept, {"cookies": []}, now=NOW)
    assert values(merged) == {("fresh", ".board.example.com"): "y"}


def test_domains_compare_without_case_or_leading_dot() -> None:
    kept = {"cookies": [cookie("sid", "old", domain=".Board.Example.COM")]}
    uploaded = {"cookies": [cookie("sid", "new", domain="board.example.com")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert values(merged) == {("sid", "board.example.com"): "new"}
    assert cookie_key(cookie("a", "", domain=".X.org")) == cookie_key(
        cookie("a", "", domain="x.org")
    )


def test_an_empty_path_is_the_root_path() -> None:
    kept = {"cookies": [cookie("sid", "old", path="")]}
    uploaded = {"cookies": [cookie("sid", "new", path="/"), cookie("sid", "deep", path="/app")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert sorted((c["path"], c["value"]) for c in merged["cookies"]) == [
        ("/", "new"),
        ("/app", "deep"),
    ]


def test_origins_merge_their_local_storage_by_name() -> None:
    kept = {"origins": [origin("https://a", k="1", j="2")]}
    uploaded = {"origins": [origin("https://a", k="3"), origin("https://b", n="4")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert storage(merged) == {"https://a": {"k": "3", "j": "2"}, "https://b": {"n": "4"}}


def test_an_empty_origin_in_a_full_snapshot_clears_the_kept_one() -> None:
    kept = {"origins": [origin("https://a", token="t"), origin("https://b", keep="k")]}
    uploaded = {FULL_SNAPSHOT: True, "origins": [origin("https://a")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert storage(merged) == {"https://b": {"keep": "k"}}


def test_an_origin_in_a_full_snapshot_replaces_the_kept_entries() -> None:
    kept = {"origins": [origin("https://a", token="t", theme="dark")]}
    uploaded = {FULL_SNAPSHOT: True, "origins": [origin("https://a", theme="light")]}
    merged = merge_storage_state(kept, uploaded, now=NOW)
    assert storage(merged) == {"https://a": {"theme": "light"}}


def test_an_empty_origin_in_a_partial_upload_changes_nothing() -> None:
    kept = {"origins": [origin("https://a", token="t")]}
    merged = merge_storage_state(kept, {"origins": [origin("https://a")]}, now=NOW)
    assert storage(merged) == {"https://a": {"token": "t"}}


def test_indexed_db_is_kept_per_origin_and_the_newer_one_wins() -> None:
    old_db = [{"name": "app", "version": 1, "stores": []}]
    new_db = [{"name": "app", "version": 2, "stores": []}]
    kept = {
        "origins": [
            {**origin("https://a", k="1"), "indexedDB": old_db},
            {**origin("https://b"), "indexedDB": old_db},
        ]
    }
    uploaded = {
        "origins": [{**origin("https://a"), "indexedDB": new_db}, origin("https://b", k="2")]
    }
    merged = {o["origin"]: o for o in merge_storage_state(kept, uploaded, now=NOW)["origins"]}
    assert merged["https://a"]["indexedDB"] == new_db
    assert merged["https://a"]["localStorage"] == [{"name": "k", "value": "1"}]
    assert merged["https://b"]["indexedDB"] == old_db  # the upload did not record it


def test_the_first_upload_is_the_session_without_its_flags() -> None:
    uploaded = {FULL_SNAPSHOT: True, "cookies": [cookie("a", "1")], "origins": []}
    assert merge_storage_state(None, uploaded, now=NOW) == {
        "cookies": [cookie("a", "1")],
        "origins": [],
    }


def test_a_session_over_the_cookie_bound_is_refused_with_counts_only() -> None:
    state = {"cookies": [cookie(f"c{i}", "secret-value") for i in range(4)], "origins": []}
    reason = session_too_large(state, max_cookies=3, max_bytes=1_000_000)
    assert reason == "the session would hold 4 cookies; at most 3 are kept"
    assert session_too_large(state, max_cookies=4, max_bytes=1_000_000) is None


def test_a_session_over_the_byte_bound_is_refused_without_its_values() -> None:
    state = {"cookies": [cookie("sid", "v" * 2000)], "origins": []}
    reason = session_too_large(state, max_cookies=10, max_bytes=1000)
    assert reason is not None and reason.startswith("the session would take ")
    assert reason.endswith("bytes; at most 1000 are kept")
    assert "sid" not in reason and "vvv" not in reason


def test_a_browser_snapshot_sends_what_the_browser_dropped_as_deletions() -> None:
    started = {
        "cookies": [cookie("auth", "t", expires=NOW + 60), cookie("prefs", "compact")],
        "origins": [origin("http://127.0.0.1:8000", greeting="hello"), origin("https://b", k="1")],
    }
    current = {"cookies": [cookie("prefs", "compact")], "origins": [origin("https://b", k="2")]}
    snapshot = browser_snapshot(started, current)
    assert snapshot[FULL_SNAPSHOT] is True
    assert snapshot["cookies"] == [cookie("prefs", "compact"), cookie("auth", "", expires=0)]
    assert snapshot["origins"][-1] == {"origin": "http://127.0.0.1:8000", "localStorage": []}
    merged = merge_storage_state(started, snapshot, now=NOW)
    assert values(merged) == {("prefs", ".board.example.com"): "compact"}
    assert storage(merged) == {"https://b": {"k": "2"}}


def test_a_browser_snapshot_clears_indexed_db_only_when_it_recorded_it() -> None:
    db = [{"name": "app", "version": 1, "stores": []}]
    started = {"origins": [{**origin("https://a", k="1"), "indexedDB": db}]}
    without = merge_storage_state(started, browser_snapshot(started, {}), now=NOW)
    assert without["origins"] == [{"origin": "https://a", "localStorage": [], "indexedDB": db}]
    recorded = browser_snapshot(started, {}, indexed_db=True)
    assert merge_storage_state(started, recorded, now=NOW)["origins"] == []


# --- properties ----------------------------------------------------------------------------

_names = st.sampled_from(["sid", "csrf", "theme", "Sid"])
_domains = st.sampled_from(["a.com", ".a.com", "A.COM", "b.com", ""])
_paths = st.sampled_from(["", "/", "/app"])
_expiries = st.sampled_from([-1, NOW - 10, NOW + 10, 0])
_cookies = st.builds(cookie, _names, st.text(max_size=3), _domains, _paths, _expiries)
_entries = st.lists(
    st.fixed_dictionaries({"name": st.sampled_from(["k", "j", "t"]), "value": st.text(max_size=3)}),
    max_size=3,
)
_origins = st.builds(
    lambda url, entries, db: (
        {"origin": url, "localStorage": entries} | ({"indexedDB": db} if db is not None else {})
    ),
    st.sampled_from(["https://a", "https://b", "http://127.0.0.1:8000"]),
    _entries,
    st.none() | st.lists(st.just({"name": "db", "version": 1, "stores": []}), max_size=1),
)
_states = st.builds(
    lambda cookies, origins, full: (
        {"cookies": cookies, "origins": origins} | ({FULL_SNAPSHOT: True} if full else {})
    ),
    st.lists(_cookies, max_size=6),
    st.lists(_origins, max_size=3),
    st.booleans(),
)


@given(kept=st.none() | _states, uploaded=_states)
def test_merging_the_same_upload_twice_changes_nothing(
    kept: dict[str, Any] | None, uploaded: dict[str, Any]
) -> None:
    once = merge_storage_state(kept, uploaded, now=NOW)
    assert merge_storage_state(once, uploaded, now=NOW) == once


@given(kept=st.none() | _states, uploaded=_states)
def test_a_later_upload_wins_on_every_key_it_has(
    kept: dict[str, Any] | None, uploaded: dict[str, Any]
) -> None:
    merged = merge_storage_state(kept, uploaded, now=NOW)
    by_key = {cookie_key(c): c for c in merged["cookies"]}
    last = {cookie_key(c): c for c in uploaded["cookies"]}
    for key, sent_cookie in last.items():
        if sent_cookie["expires"] == -1 or sent_cookie["expires"] > NOW:
            assert by_key[key] == sent_cookie
        else:
            assert key not in by_key
    sent: dict[str, dict[str, str]] = {}
    for o in uploaded["origins"]:  # what the upload says, a later mention of an origin winning
        entries = {e["name"]: e["value"] for e in o["localStorage"]}
        full = uploaded.get(FULL_SNAPSHOT, False)
        sent[o["origin"]] = entries if full else sent.get(o["origin"], {}) | entries
    merged_storage = storage(merged)
    for url, entries in sent.items():
        for name, value in entries.items():
            assert merged_storage[url][name] == value


@given(kept=_states, uploaded=_states)
def test_kept_cookies_the_upload_does_not_name_survive_unless_expired(
    kept: dict[str, Any], uploaded: dict[str, Any]
) -> None:
    merged_keys = {cookie_key(c) for c in merge_storage_state(kept, uploaded, now=NOW)["cookies"]}
    named = {cookie_key(c) for c in uploaded["cookies"]}
    for c in kept["cookies"]:
        if cookie_key(c) not in named and (c["expires"] == -1 or c["expires"] > NOW):
            assert cookie_key(c) in merged_keys


def test_a_playwright_storage_state_has_the_shape_of_one() -> None:
    state = {
        "cookies": [
            {"name": "sid", "value": "1", "domain": ".a.example", "path": "/", "expires": -1,
             "httpOnly": True, "secure": True, "sameSite": "Lax", "partitionKey": "x"},
        ],
        "origins": [
            {"origin": "https://a.example", "localStorage": [{"name": "k", "value": "v"}],
             "indexedDB": [{"name": "db", "version": 1, "stores": []}]},
        ],
        "full_snapshot": True,
    }  # fmt: skip
    assert storage_state_problem(state) is None
    assert storage_state_problem({}) is None


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"cookies": {"name": "a"}},
        {"cookies": [{"name": ["a"], "value": "b"}]},
        {"cookies": [{"name": "a", "value": 1}]},
        {"cookies": [{"name": "a", "value": "b", "expires": "soon"}]},
        {"cookies": [{"name": "a", "value": "b", "expires": True}]},
        {"origins": [{"origin": ["https://a.example"]}]},
        {
            "origins": [
                {"origin": "https://a.example", "localStorage": [{"name": ["a"], "value": "b"}]}
            ]
        },
        {
            "origins": [
                {"origin": "https://a.example", "localStorage": [{"name": "a", "value": {}}]}
            ]
        },
        {"origins": [{"origin": "https://a.example", "localStorage": "a=b"}]},
        {"cookies": [{"name": str(n), "value": ""} for n in range(MAX_COOKIES + 1)]},
        {"full_snapshot": "yes"},
    ],
)
def test_a_malformed_storage_state_is_named_without_its_values(state: Any) -> None:
    problem = storage_state_problem(state)
    assert problem is not None
    assert "https://a.example" not in problem and "soon" not in problem


def test_a_kept_entry_without_a_string_name_is_dropped_not_raised() -> None:
    kept = {"origins": [{"origin": "https://a.example", "localStorage": [{"name": ["x"]}]}]}
    uploaded = {"origins": [{"origin": "https://a.example", "localStorage": [
        {"name": "k", "value": "v"}]}]}  # fmt: skip
    merged = merge_storage_state(kept, uploaded, now=0)
    assert merged["origins"][0]["localStorage"] == [{"name": "k", "value": "v"}]
