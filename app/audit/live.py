"""The auditor's logic: the checker fed live, its violations counted in Prometheus and the
first of each kind posted (pure of I/O but the metrics; the process is ``workers/auditor.py``)."""

from __future__ import annotations

import structlog
from prometheus_client import Counter, Gauge

from app.alerts.book import Post
from app.audit.checker import Checker, Violation
from app.audit.report import violation_line

log = structlog.get_logger()

VIOLATIONS = Counter(
    "qm_audit_violations_total", "Exclusivity violations the auditor found, by kind.", ["kind"]
)
LAG = Gauge(
    "qm_audit_lag_seconds",
    "How far behind the events topic the auditor is: the database time of the newest event it "
    "read, to now, while events wait to be read (0 once it read them all).",
)


class LiveAudit:
    """The checker over a followed topic; the first violation of each kind becomes a post."""

    def __init__(self, *, reorder_seconds: float, grace_seconds: float) -> None:
        self.reorder_seconds = reorder_seconds
        self.checker = Checker(
            reorder_seconds=reorder_seconds, grace_seconds=grace_seconds, on_violation=self._found
        )
        self._alerted: set[str] = set()
        self._posts: list[Post] = []

    def _found(self, violation: Violation) -> None:
        VIOLATIONS.labels(violation.kind).inc()
        log.error(
            "audit_violation",
            kind=violation.kind,
            subject=violation.subject,
            events=[str(p) for p in violation.positions],
        )
        if violation.kind not in self._alerted:  # once per kind: the log and metric tell the rest
            self._alerted.add(violation.kind)
            self._posts.append(
                Post(f"audit:{violation.kind}", f"Audit: {violation_line(violation)}")
            )

    def tick(self, now: float, *, caught_up: bool) -> None:
        """Every topic partition read to its end (``caught_up``): nothing older than the reorder
        window can still come, so check up to there, and flag leases left unended past it."""
        newest = self.checker.newest
        if caught_up:
            LAG.set(0)
            self.checker.release_until(now - self.reorder_seconds)
            self.checker.lapsed(now - self.reorder_seconds)
        elif newest is not None:
            LAG.set(max(0.0, now - newest))

    def take_posts(self) -> list[Post]:
        posts, self._posts = self._posts, []
        return posts
