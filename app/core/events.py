"""Lifecycle events: every state change on ``qm.events``, terminal job events on ``qm.job-events``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from app.outbox.writer import Outbox
from app.settings import Settings
from app.store import Row
from schemas.messages import LifecycleEvent, TerminalJobEvent

Entity = Literal["job", "account", "seed", "session", "capture", "proxy", "site", "dead_letter"]

TERMINAL_EVENT_TYPES: dict[str, Any] = {
    "SUCCEEDED": "job.succeeded",
    "FAILED": "job.failed",
    "CANCELLED": "job.cancelled",
    "TIMED_OUT": "job.timed_out",
}
# EXPIRED is not terminal: its collector may start the job again (below the attempt cap; at the
# cap the reaper makes it FAILED). So job.expired goes to qm.events only, never to qm.job-events.


class Events:
    """Writes events into the transaction's outbox."""

    def __init__(self, settings: Settings, box: Outbox, operator: str | None = None) -> None:
        self.settings = settings
        self.box = box
        # the operator whose action this transaction is: every event it writes names them
        self.operator = operator

    def emit(
        self,
        entity: Entity,
        what: str,
        *,
        id: str,
        site: str,
        status: str,
        job_id: str | None = None,
        reason: str | None = None,
        history: Row | None = None,
    ) -> None:
        """One lifecycle event, keyed by the entity's id; ``history`` is the transition's row,
        whose ``db_at`` (the database's clock), lease and handoff fields it carries when present."""
        event = LifecycleEvent(
            type=f"{entity}.{what}",
            entity=entity,
            id=id,
            site=site,
            status=status,
            at=datetime.now(UTC),
            job_id=job_id,
            reason=reason,
            operator=self.operator,
            **({} if history is None else _history(history)),
        )
        # pydantic's own JSON: the same document as json.dumps of model_dump, at a third of the cost
        self.box.add(
            self.settings.topic("events"), id, event.model_dump_json(exclude_none=True).encode()
        )

    def job(self, what: str, job: Row) -> None:
        """A job event; a terminal one also goes to ``qm.job-events`` for Airflow sensors."""
        status = str(job["status"])
        self.emit(
            "job",
            what,
            id=job["id"],
            site=job["site"],
            status=status,
            reason=job.get("reason"),
            history=job,
        )
        terminal = TERMINAL_EVENT_TYPES.get(status)
        if terminal is not None:
            event = TerminalJobEvent(
                type=terminal,
                job_id=job["id"],
                site=job["site"],
                collector=job["collector"],
                status=status,
                finished_at=job["finished_at"] or datetime.now(UTC),
            )
            self.box.add(
                self.settings.topic("job-events"), job["id"], event.model_dump_json().encode()
            )

    def account(self, what: str, account: Row, job_id: str | None = None) -> None:
        self.emit(
            "account",
            what,
            id=str(account["id"]),
            site=account["site"],
            status=str(account["status"]),
            job_id=job_id,
        )

    def capture(self, what: str, capture: Row) -> None:
        """A capture event (received, handed_off, retrying, failed, reclaimed, retried)."""
        self.emit(
            "capture",
            what,
            id=capture["id"],
            site=capture["site"],
            status=str(capture["status"]),
            job_id=capture["job_id"],
            reason=capture.get("last_error"),
            history=capture,
        )


def _history(row: Row) -> dict[str, Any]:
    """The fields of ``row`` the audit reads (docs/audit.md), those it has."""
    account_id = row.get("account_id")
    return {
        "db_at": row.get("db_at"),
        "lease_token": row.get("lease_token"),
        "account_id": None if account_id is None else str(account_id),
        "lease_expires_at": row.get("lease_expires_at"),
        "capacity": row.get("capacity"),
        "handoff_token": row.get("handoff_token"),
    }
