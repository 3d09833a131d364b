"""`qm bench audit`: a clean synthetic history through the checker, its rate and peak memory."""

from __future__ import annotations

from typer.testing import CliRunner

from app.audit.checker import Checker
from app.audit.facts import Position
from app.bench.audit import History
from app.cli import app


def test_audit_bench_prints_its_rate_and_peak_memory() -> None:
    result = CliRunner().invoke(app, ["bench", "audit", "--events", "20000"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "events/s" in out and "peak memory (RSS)" in out and "0 violations" in out


def test_audit_bench_history_is_clean_and_breaks_when_an_account_is_given_twice() -> None:
    history = History(sites=3, accounts=4, capacity=3, rate=1000.0)
    events = list(history.events(5000))
    checker = Checker()
    for offset, value in enumerate(events):
        checker.feed(Position("bench", 0, offset), value)
    assert sum(checker.finish().violations.values()) == 0
    granted = next(e for e in events if b'"job.granted"' in e)
    doubled = granted.replace(b'"job-', b'"again-').replace(b'"lease_token": ', b'"lease_token": 9')
    broken = Checker()
    for offset, value in enumerate([granted, doubled]):
        broken.feed(Position("bench", 0, offset), value)
    broken.finish()
    assert [v.kind for v in broken.violations] == ["overlap"]
