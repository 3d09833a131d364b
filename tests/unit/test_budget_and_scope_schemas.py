"""The contract's policy fields: scopes, rate limits and units are checked at the schema."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.messages import JobFinish, JobHeartbeat, JobQueued, JobStart

LEASE = {"lease_token": 7, "lease_secret": "s" * 43}


def finish(**fields: Any) -> JobFinish:
    return JobFinish(request_id=uuid.uuid4(), job_id="j", **LEASE, **fields)


def test_a_rate_limited_finish_names_when_its_scope_resets_one_way() -> None:
    finish(outcome="rate_limited", scope="search", retry_after_seconds=0)
    finish(outcome="rate_limited", reset_at="2030-01-01T00:00:00Z")
    for fields in ({}, {"retry_after_seconds": 5, "reset_at": "2030-01-01T00:00:00Z"}):
        with pytest.raises(ValidationError, match="one of retry_after_seconds and reset_at"):
            finish(outcome="rate_limited", **fields)


def test_scope_and_reset_fields_are_refused_on_other_outcomes() -> None:
    with pytest.raises(ValidationError, match="scope, retry_after_seconds: only with outcome"):
        finish(outcome="succeeded", scope="search", retry_after_seconds=0)


@pytest.mark.parametrize("scope", ["", "Search", "-x", "a" * 33, "sp ace", "ü"])
def test_a_scope_is_a_short_lowercase_token(scope: str) -> None:
    with pytest.raises(ValidationError):
        finish(outcome="rate_limited", scope=scope, retry_after_seconds=1)


def test_units_are_a_bounded_running_total_on_heartbeat_and_finish() -> None:
    JobHeartbeat(request_id=uuid.uuid4(), job_id="j", **LEASE, units=0)
    assert finish(outcome="succeeded", units=12).units == 12
    for units in (-1, 1_000_000_001):
        with pytest.raises(ValidationError):
            JobHeartbeat(request_id=uuid.uuid4(), job_id="j", **LEASE, units=units)


def test_a_start_may_name_a_scope_and_a_queued_reply_says_why() -> None:
    assert "scope" in JobStart.model_fields
    queued = JobQueued(request_id=uuid.uuid4(), job_id="j", position=2, reason="budget")
    assert queued.model_dump()["reason"] == "budget"
