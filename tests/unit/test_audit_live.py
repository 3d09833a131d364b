"""The auditor's logic: facts held for the reorder window of wall time, the first violation of
each kind posted, every one counted."""

from __future__ import annotations

import json

from app.audit.facts import Position
from app.audit.live import VIOLATIONS, LiveAudit
from tests.unit.test_audit_checker import T0, History


def test_audit_live_posts_the_first_violation_of_each_kind_once_and_counts_them_all() -> None:
    history = History()
    history.grant(0, "j1", 1, capacity=9)
    history.grant(1, "j2", 2, capacity=9)  # overlap
    history.grant(2, "j3", 3, capacity=9)  # overlap again
    history.handoff(3, "cap", 10)
    history.handoff(4, "cap", 11)  # handed off twice
    before = VIOLATIONS.labels("overlap")._value.get()
    audit = LiveAudit(reorder_seconds=30, grace_seconds=300)
    for offset, event in enumerate(history.events):
        audit.checker.feed(Position("qm.events", 0, offset), json.dumps(event))
    start = T0.timestamp()
    audit.tick(start + 10, caught_up=True)  # within the window: nothing checked yet
    assert audit.take_posts() == [] and audit.checker.violations == []
    audit.tick(start + 10, caught_up=False)  # behind: nothing released on wall time
    assert audit.checker.violations == []
    audit.tick(start + 40, caught_up=True)
    posts = audit.take_posts()
    assert [p.cause for p in posts] == ["audit:overlap", "audit:capture_handed_off_twice"]
    assert "qm.events[0]@0, qm.events[0]@1" in posts[0].text
    assert VIOLATIONS.labels("overlap")._value.get() == before + 2
    assert audit.take_posts() == []


def test_audit_live_flags_a_lease_left_unended_past_its_grace() -> None:
    history = History()
    history.grant(0, "j1", 1, lease=60)
    audit = LiveAudit(reorder_seconds=30, grace_seconds=100)
    audit.checker.feed(Position("qm.events", 0, 0), json.dumps(history.events[0]))
    start = T0.timestamp()
    audit.tick(start + 150, caught_up=True)  # expired at 60, grace to 160, checked up to 120
    assert audit.take_posts() == []
    audit.tick(start + 200, caught_up=True)
    [post] = audit.take_posts()
    assert post.cause == "audit:never_ended"
