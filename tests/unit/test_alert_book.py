"""The alert book: one post per cause, repeats rate-limited, one recovery."""

from __future__ import annotations

from app.alerts.book import AlertBook, Post


def test_a_cause_is_posted_once_then_at_most_once_per_repeat_interval_with_its_count() -> None:
    book = AlertBook(repeat_seconds=60)
    assert book.fire("waiting:board", "3 wait", now=0) == Post("waiting:board", "3 wait")
    assert [book.fire("waiting:board", "4 wait", now=t) for t in (10, 20, 59)] == [None] * 3
    repeat = book.fire("waiting:board", "5 wait", now=60)
    assert repeat == Post("waiting:board", "5 wait (still firing: 4x since the last message)")
    assert book.fire("waiting:board", "5 wait", now=61) is None


def test_causes_are_counted_apart() -> None:
    book = AlertBook(repeat_seconds=60)
    assert book.fire("waiting:board", "a", now=0) is not None
    assert book.fire("waiting:forum", "b", now=1) is not None
    assert sorted(book.firing("waiting")) == ["waiting:board", "waiting:forum"]
    assert book.firing("outbox_lag") == []


def test_clearing_a_firing_cause_posts_one_recovery_and_a_quiet_one_posts_nothing() -> None:
    book = AlertBook(repeat_seconds=60)
    assert book.clear("outbox_lag", now=0) is None
    book.fire("outbox_lag", "lag 90 s", now=10)
    assert book.clear("outbox_lag", now=40) == Post(
        "outbox_lag", "Recovered: lag 90 s (after 30 s)", recovered=True
    )
    assert book.clear("outbox_lag", now=41) is None
    assert book.fire("outbox_lag", "lag 70 s", now=42) == Post("outbox_lag", "lag 70 s")
