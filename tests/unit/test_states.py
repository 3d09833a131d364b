from typing import TypeVar

from schemas.states import (
    ACCOUNT_TRANSITIONS,
    JOB_TRANSITIONS,
    AccountStatus,
    JobStatus,
    predecessors,
)

T = TypeVar("T")


def is_legal(table: dict[T, frozenset[T]], before: T, after: T) -> bool:
    """Whether ``before -> after`` is a transition of ``table``."""
    return after in table[before]


def test_running_job_is_only_reached_from_queued() -> None:
    assert predecessors(JOB_TRANSITIONS, JobStatus.RUNNING) == (JobStatus.QUEUED,)


def test_grant_is_legal_and_terminal_jobs_go_nowhere() -> None:
    assert is_legal(ACCOUNT_TRANSITIONS, AccountStatus.ACTIVE, AccountStatus.USING)
    assert not is_legal(ACCOUNT_TRANSITIONS, AccountStatus.BLOCKED, AccountStatus.USING)
    for terminal in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
        JobStatus.TIMED_OUT,
    ):
        assert JOB_TRANSITIONS[terminal] == frozenset()


def test_every_state_has_a_row_in_its_table() -> None:
    assert set(JOB_TRANSITIONS) == set(JobStatus)
    assert set(ACCOUNT_TRANSITIONS) == set(AccountStatus)
