"""The events of the contract: lifecycle events on ``qm.events``, terminal job events on
``qm.job-events``, and the records of ``qm.captures`` and ``qm.captures.ready``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict

from schemas.base import Message


class LifecycleEvent(Message):
    """Every state change on ``qm.events``, keyed by entity id, for dashboards and downstream.

    Open to fields added later (its JSON Schema allows them): events gain fields without a new
    ``v``, and a consumer that validates against this schema keeps working when they do.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str  # "<entity>.<what happened>", e.g. "job.granted", "account.released"
    entity: Literal["job", "account", "seed", "session", "capture", "proxy", "site", "dead_letter"]
    id: str
    site: str
    status: str
    at: datetime
    job_id: str | None = None
    reason: str | None = None
    # the history `qm audit` checks (docs/audit.md); absent where they do not apply
    db_at: datetime | None = None  # the database's clock_timestamp() at the transition
    lease_token: int | None = None  # the lease a job, account or seed event is about
    account_id: str | None = None  # the account a job's lease holds
    lease_expires_at: datetime | None = None  # the lease's expiry as the transition left it
    capacity: int | None = None  # the site's capacity in force at a grant
    handoff_token: int | None = None  # the handoff claim a capture event is about
    operator: str | None = None  # who acted, for a change an operator made (the web console)


class TerminalJobEvent(Message):
    """A job's end on ``qm.job-events``: small, for Airflow sensors."""

    type: Literal["job.succeeded", "job.failed", "job.cancelled", "job.expired", "job.timed_out"]
    job_id: str
    site: str
    collector: str
    status: str
    finished_at: datetime


class CaptureHandoff(Message):
    """The record on ``qm.captures`` that starts a capture's next handoff attempt."""

    type: Literal["capture.handoff"] = "capture.handoff"
    capture_id: str


class CaptureReady(Message):
    """A capture that was handed off, on ``qm.captures.ready`` keyed by ``capture_id``."""

    type: Literal["capture.ready"] = "capture.ready"
    capture_id: str
    job_id: str
    site: str
    url: str
    storage_uri: str
    sha256: str
    content_type: str
    size: int
    captured_at: datetime
    handed_off_at: datetime
    meta: dict[str, Any] | None = None
