"""The exclusivity checker on synthetic histories: each made to break one rule, and clean ones."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.audit.checker import Checker, Violation
from app.audit.facts import Position, Unreadable, fact_of, read_fact

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class History:
    """Events as Quartermaster publishes them, at given seconds of the database's clock."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _add(self, second: float, **event: Any) -> None:
        event.setdefault("v", 1)
        event.setdefault("site", "board")
        event["db_at"] = (T0 + timedelta(seconds=second)).isoformat()
        event["at"] = event["db_at"]
        self.events.append(event)

    def grant(self, second: float, job: str, token: int, account: str | None = "a1",
              lease: float = 60, capacity: int | None = 1) -> None:  # fmt: skip
        expires = (T0 + timedelta(seconds=second + lease)).isoformat()
        self._add(second, type="job.granted", entity="job", id=job, status="RUNNING",
                  lease_token=token, account_id=account, lease_expires_at=expires,
                  capacity=capacity)  # fmt: skip

    def extend(self, second: float, job: str, token: int, until: float,
               account: str | None = None) -> None:  # fmt: skip
        expires = (T0 + timedelta(seconds=until)).isoformat()
        self._add(second, type="job.extended", entity="job", id=job, status="RUNNING",
                  lease_token=token, lease_expires_at=expires, account_id=account)  # fmt: skip

    def end(self, second: float, job: str, token: int, what: str = "finished") -> None:
        self._add(second, type=f"job.{what}", entity="job", id=job, status="SUCCEEDED",
                  lease_token=token)  # fmt: skip

    def seed(self, second: float, seed: str, token: int, what: str = "assigned") -> None:
        self._add(second, type=f"seed.{what}", entity="seed", id=seed, status="ASSIGNED",
                  lease_token=token)  # fmt: skip

    def handoff(self, second: float, capture: str, token: int) -> None:
        self._add(second, type="capture.handed_off", entity="capture", id=capture,
                  status="HANDED_OFF", handoff_token=token)  # fmt: skip

    def check(self, order: list[int] | None = None, **options: Any) -> Checker:
        checker = Checker(**options)
        indexes = order if order is not None else range(len(self.events))
        for offset in indexes:
            checker.read()
            fact = fact_of(self.events[offset], Position("qm.events", 0, offset))
            if fact is None:
                checker.ignore()
            else:
                checker.add(fact)
        checker.finish()
        return checker


def only(checker: Checker) -> Violation:
    assert len(checker.violations) == 1, checker.violations
    return checker.violations[0]


def clean_history() -> History:
    h = History()
    h.grant(0, "j1", 1, capacity=2)
    h.seed(0.1, "s1", 1)
    h.extend(30, "j1", 1, until=120)
    h.grant(31, "j2", 2, account="a2", capacity=2)
    h.seed(50, "s1", 1, "done")
    h.end(100, "j1", 1)
    h.seed(101, "s1", 2)  # the seed, back, to the other lease
    h.grant(102, "j3", 3, capacity=2)  # the account, free, to the next job
    h.handoff(103, "cap-1", 50)
    h.handoff(103, "cap-1", 50)  # published twice by a relay that died before deleting it
    h.end(110, "j2", 2, "expired")
    h.seed(110.1, "s1", 2, "released")
    h.end(120, "j3", 3, "revoked")
    h.end(120, "j3", 3, "revoked")
    return h


def test_audit_finds_nothing_in_a_clean_history() -> None:
    checker = clean_history().check()
    assert checker.violations == []
    assert checker.summary.duplicates == 2
    assert checker.summary.live_at_end == 0
    assert checker.summary.facts["job.granted"] == 3


def test_audit_orders_a_history_read_out_of_order_by_the_database_clock() -> None:
    h = clean_history()
    order = list(range(len(h.events)))
    random.Random(7).shuffle(order)  # partitions deliver keys in any order
    checker = h.check(order)
    assert checker.violations == [] and checker.summary.late == 0


def test_audit_finds_an_account_leased_twice() -> None:
    h = History()
    h.grant(0, "j1", 1, capacity=5)
    h.grant(10, "j2", 2, capacity=5)  # the same account while j1 still holds it
    h.end(20, "j1", 1)
    h.end(21, "j2", 2)
    found = only(h.check())
    assert found.kind == "overlap" and found.subject == "account a1"
    assert found.positions == (Position("qm.events", 0, 0), Position("qm.events", 0, 1))


def test_audit_finds_a_token_going_back() -> None:
    h = History()
    h.grant(0, "j1", 7)
    h.end(5, "j1", 7)
    h.grant(10, "j2", 6)  # an older token after a newer one, on the same account
    h.end(15, "j2", 6)
    found = only(h.check())
    assert found.kind == "token_regressed" and found.subject == "account a1"
    assert [p.offset for p in found.positions] == [0, 2]


def test_audit_finds_a_site_over_its_capacity() -> None:
    h = History()
    h.grant(0, "j1", 1, account="a1", capacity=2)
    h.grant(1, "j2", 2, account="a2", capacity=2)
    h.grant(2, "j3", 3, account="a3", capacity=2)
    for n in (1, 2, 3):
        h.end(10 + n, f"j{n}", n)
    found = only(h.check())
    assert found.kind == "capacity_exceeded" and found.subject == "site board"
    assert [p.offset for p in found.positions] == [0, 1, 2]


def test_audit_finds_a_grant_never_ended() -> None:
    h = History()
    h.grant(0, "j1", 1, lease=60)
    h.grant(1, "j2", 2, account="a2", capacity=None)
    h.end(400, "j2", 2)  # the history goes on past j1's expiry and the grace
    found = only(h.check(grace_seconds=300))
    assert found.kind == "never_ended" and found.subject == "lease 1"
    assert found.positions == (Position("qm.events", 0, 0),)


def test_audit_lets_a_lease_still_within_its_time_live_at_the_end() -> None:
    h = History()
    h.grant(0, "j1", 1, lease=60)
    h.extend(50, "j1", 1, until=400)  # extended: its expiry moved on
    h.grant(51, "j2", 2, account="a2", capacity=None)
    h.end(390, "j2", 2)
    checker = h.check(grace_seconds=300)
    assert checker.violations == [] and checker.summary.live_at_end == 1


def test_audit_finds_a_grant_ended_twice_and_extended_after_its_end() -> None:
    h = History()
    h.grant(0, "j1", 1)
    h.end(10, "j1", 1, "finished")
    h.extend(11, "j1", 1, until=100)
    h.end(12, "j1", 1, "expired")
    kinds = [v.kind for v in h.check().violations]
    assert kinds == ["extended_after_end", "ended_twice"]


def test_audit_finds_a_seed_held_by_two_live_leases() -> None:
    h = History()
    h.grant(0, "j1", 1, account=None, capacity=None)
    h.grant(1, "j2", 2, account=None, capacity=None)
    h.seed(2, "s9", 1)
    h.seed(3, "s9", 2)  # j1 never gave it back
    h.end(4, "j1", 1)
    h.end(5, "j2", 2)
    found = only(h.check())
    assert found.kind == "seed_held_twice" and found.subject == "seed s9"
    assert [p.offset for p in found.positions] == [2, 3]


def test_audit_finds_a_capture_handed_off_twice() -> None:
    h = History()
    h.handoff(0, "cap-1", 10)
    h.handoff(50, "cap-1", 11)  # a second claim handed it off again
    found = only(h.check())
    assert found.kind == "capture_handed_off_twice" and found.subject == "capture cap-1"


def test_audit_counts_and_names_what_it_cannot_read() -> None:
    checker = Checker()
    for offset, value in enumerate(
        [b"{not json", b"[1]", b'{"type": "job.granted", "id": "j"}',
         json.dumps({"type": "job.granted", "db_at": "yesterday", "id": "j"}).encode()]
    ):  # fmt: skip
        position = Position("qm.events", 2, offset)
        with pytest.raises(Unreadable) as caught:
            read_fact(value, position)
        checker.unreadable(position, str(caught.value))
    summary = checker.finish()
    assert summary.unreadable == 4
    reasons = [why for _, why in summary.unreadable_examples]
    assert reasons[0] == "not JSON" and "db_at" in reasons[2] and "db_at" in reasons[3]
    assert read_fact(b'{"type": "account.blocked"}', Position("t", 0, 0)) is None
    waiting = {"type": "job.cancelled", "id": "j", "site": "board"}  # a waiting job's: no lease
    assert fact_of(waiting, Position("t", 0, 0)) is None


def test_audit_feed_counts_an_event_nested_too_deep_or_of_an_odd_shape_and_goes_on() -> None:
    """One odd event on the topic never stops the auditor (in `qm run all`, its crash would stop
    the claim workers with it)."""
    checker = Checker()
    deep = b"[" * 100_000 + b"]" * 100_000
    odd = json.dumps({"type": "job.granted", "db_at": 5, "id": ["not", "a", "string"]}).encode()
    for offset, value in enumerate([deep, odd, b'{"type": "account.blocked"}']):
        checker.feed(Position("qm.events", 0, offset), value)
    summary = checker.finish()
    assert summary.events == 3 and summary.unreadable == 2 and summary.ignored == 1
    assert summary.unreadable_examples[0][1] == "JSON nested too deep"


def test_audit_finds_an_overlap_with_a_lease_granted_before_the_history_began() -> None:
    """The live auditor starts at the topic's end: a lease first seen heartbeating is live."""
    h = History()
    h.extend(10, "j1", 7, until=100, account="a1")  # granted before the read began
    h.grant(20, "j2", 8, account="a1", capacity=2)  # the account again, while j1 holds it
    h.end(30, "j2", 8)
    h.end(40, "j1", 7)
    found = only(h.check())
    assert found.kind == "overlap" and found.subject == "account a1"
    clean = History()
    clean.extend(10, "j1", 7, until=100, account="a1")
    clean.end(15, "j1", 7)
    clean.grant(20, "j2", 8, account="a1")
    clean.end(30, "j2", 8)
    assert clean.check().violations == []


def test_audit_memory_is_bounded_by_what_is_live_not_by_the_history() -> None:
    h = History()
    for n in range(1, 2001):
        h.grant(n * 10, f"j{n}", n, account=f"a{n % 5}", capacity=None)
        h.handoff(n * 10 + 1, f"cap-{n}", 10_000 + n)
        h.end(n * 10 + 5, f"j{n}", n)
    checker = h.check(horizon_seconds=600)
    assert checker.violations == []
    assert len(checker.leases) == 0 and len(checker.holders) == 0
    assert len(checker.ended.entries) <= 61 and len(checker.handed.entries) <= 61


def test_audit_finds_a_second_end_older_than_the_horizon_by_the_accounts_tokens() -> None:
    h = History()
    h.grant(0, "j1", 1)
    h.end(10, "j1", 1)
    h.events[-1]["account_id"] = "a1"  # an end names its lease's account
    h.grant(20, "j2", 2)
    h.end(30, "j2", 2)
    h.end(5000, "j1", 1, "expired")  # long after the horizon forgot j1's end
    h.events[-1]["account_id"] = "a1"
    found = only(h.check(horizon_seconds=60, grace_seconds=10_000))
    assert found.kind == "ended_twice" and found.positions == (Position("qm.events", 0, 4),)


def test_audit_passes_over_a_refused_grant_and_ends_of_leases_granted_before_the_window() -> None:
    h = History()
    h.end(0, "old", 1)  # granted before what was read
    h.events[-1]["account_id"] = "a1"
    h.grant(10, "j2", 5)
    h.end(11, "refused", 6, "rejected")  # a grant refused in its own transaction
    h.events[-1]["account_id"] = "a2"
    h.end(20, "j2", 5)
    checker = h.check()
    assert checker.violations == [] and checker.summary.before_window == 2
