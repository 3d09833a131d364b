"""The SDK's policy calls: ``job.scope``, ``job.rate_limited(…)`` and ``job.units(n)`` become the
fields of ``job.start``, ``job.heartbeat`` and ``job.finish`` (docs/policy.md)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.sdk import InvalidArgument
from tests.unit.test_sdk_job import Server
from tests.unit.test_sdk_job import server as server  # the fixture


def sent(server: Server, kind: str) -> list[dict[str, object]]:
    return [body for _, _, body, _ in server.producer.sent if body["type"] == kind]


async def test_a_jobs_scope_is_sent_with_its_start(server: Server) -> None:
    async with server.client.job(site="example", scope="search") as job:
        assert job.scope == "search"

    assert sent(server, "job.start")[0]["scope"] == "search"


async def test_rate_limited_finishes_with_the_scope_and_reset_and_wins_over_an_exception(
    server: Server,
) -> None:
    with pytest.raises(RuntimeError):
        async with server.client.job(site="example", scope="search") as job:
            job.rate_limited(retry_after=12.2, reason="429 Too Many Requests")
            raise RuntimeError("the page said so")

    finish = server.finish()
    assert (finish["outcome"], finish["retry_after_seconds"], finish["reason"]) == (
        "rate_limited",
        13,  # rounded up: never asks again before the reset
        "429 Too Many Requests",
    )
    assert finish["scope"] is None  # Quartermaster takes the job's own


async def test_rate_limited_until_a_time_for_another_scope(server: Server) -> None:
    reset = datetime(2031, 1, 1, tzinfo=UTC)
    async with server.client.job(site="example") as job:
        job.rate_limited(reset_at=reset, scope="profile")

    finish = server.finish()
    assert (finish["scope"], finish["reset_at"]) == ("profile", "2031-01-01T00:00:00Z")


async def test_units_are_counted_and_sent_as_the_leases_running_total(server: Server) -> None:
    async with server.client.job(site="example") as job:
        assert job.units(3) == 3
        assert job.units() == 4

    assert server.finish()["units"] == 4


async def test_bad_rate_limits_and_units_are_refused_in_the_body(server: Server) -> None:
    async with server.client.job(site="example") as job:
        with pytest.raises(InvalidArgument, match="one of retry_after and reset_at"):
            job.rate_limited()
        with pytest.raises(InvalidArgument, match="scope"):
            job.rate_limited(retry_after=1, scope="Not A Scope")
        with pytest.raises(InvalidArgument, match="units"):
            job.units(-1)

    assert server.finish()["outcome"] == "succeeded"
