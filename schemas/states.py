"""State enums and their legal-transition tables (the database enums are kept equal by a test)."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

T = TypeVar("T", bound=StrEnum)


class AccountStatus(StrEnum):
    ACTIVE = "ACTIVE"
    USING = "USING"
    BLOCKED = "BLOCKED"
    INACTIVE = "INACTIVE"


class SeedStatus(StrEnum):
    ACTIVE = "ACTIVE"
    ASSIGNED = "ASSIGNED"
    DISABLED = "DISABLED"


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"


class ProxyStatus(StrEnum):
    ACTIVE = "ACTIVE"  # carries accounts (resting after a failure until its available_at)
    BLOCKED = "BLOCKED"  # failed too often in a row, or blocked by an operator: carries none


class CaptureStatus(StrEnum):
    RECEIVED = "RECEIVED"
    HANDING_OFF = "HANDING_OFF"
    HANDED_OFF = "HANDED_OFF"
    FAILED = "FAILED"


A, S, J, C = AccountStatus, SeedStatus, JobStatus, CaptureStatus

ACCOUNT_TRANSITIONS: dict[AccountStatus, frozenset[AccountStatus]] = {
    A.ACTIVE: frozenset({A.USING, A.BLOCKED, A.INACTIVE}),  # BLOCKED: by an operator
    # INACTIVE: a grant found its secret or session sealed with no key of QM_SECRET_KEYS, or a
    # block reached its site's retire_after_blocks in a row (retired)
    A.USING: frozenset({A.ACTIVE, A.BLOCKED, A.INACTIVE}),
    A.BLOCKED: frozenset({A.ACTIVE, A.INACTIVE}),
    A.INACTIVE: frozenset({A.ACTIVE}),
}

SEED_TRANSITIONS: dict[SeedStatus, frozenset[SeedStatus]] = {
    S.ACTIVE: frozenset({S.ASSIGNED, S.DISABLED}),
    S.ASSIGNED: frozenset({S.ACTIVE, S.DISABLED}),
    S.DISABLED: frozenset({S.ACTIVE}),
}

# EXPIRED -> QUEUED: a collector that restarts the same job_id after its lease was reaped is
# queued again, until the site's attempt cap turns the job into FAILED (attempts_exhausted).
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.QUEUED: frozenset({J.RUNNING, J.TIMED_OUT, J.CANCELLED}),
    J.RUNNING: frozenset({J.SUCCEEDED, J.FAILED, J.CANCELLED, J.EXPIRED}),
    J.EXPIRED: frozenset({J.QUEUED, J.FAILED}),
    J.SUCCEEDED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELLED: frozenset(),
    J.TIMED_OUT: frozenset(),
}

PROXY_TRANSITIONS: dict[ProxyStatus, frozenset[ProxyStatus]] = {
    # BLOCKED: the failure that makes block_after in a row, or an operator
    ProxyStatus.ACTIVE: frozenset({ProxyStatus.BLOCKED}),
    ProxyStatus.BLOCKED: frozenset({ProxyStatus.ACTIVE}),  # an operator's unblock
}

CAPTURE_TRANSITIONS: dict[CaptureStatus, frozenset[CaptureStatus]] = {
    C.RECEIVED: frozenset({C.HANDING_OFF}),
    C.HANDING_OFF: frozenset({C.HANDED_OFF, C.RECEIVED, C.FAILED}),
    C.HANDED_OFF: frozenset(),
    C.FAILED: frozenset({C.RECEIVED}),  # an operator's retry
}

TERMINAL_JOB_STATUSES = frozenset(s for s, nxt in JOB_TRANSITIONS.items() if not nxt) | {J.EXPIRED}


def predecessors(table: dict[T, frozenset[T]], target: T) -> tuple[T, ...]:
    """The legal predecessor states of ``target``: what a conditional UPDATE puts in its WHERE."""
    return tuple(sorted(s for s, nxt in table.items() if target in nxt))
