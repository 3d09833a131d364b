"""The SDK's seeds: the grant's, more by claim_seeds, and results sent once with job.finish."""

from __future__ import annotations

from typing import Any

import pytest

from app.sdk import LeaseLost, QuartermasterClient
from schemas.messages import GrantedSeed, JobLeaseLost, SeedsClaimed
from tests.unit.test_sdk_client import RecordingProducer, reply_headers
from tests.unit.test_sdk_job import LEASE_SECRET, Server


class SeedServer(Server):
    """Grants, then answers seeds.claim with the next seeds (or lease_lost once told to)."""

    lost = False
    claims: list[dict[str, Any]]

    def answer(self, body: dict[str, Any], cid: str) -> None:
        if body["type"] != "seeds.claim":
            super().answer(body, cid)
            return
        self.claims.append(body)
        reply: Any
        if self.lost:
            reply = JobLeaseLost(
                request_id=body["request_id"], job_id=body["job_id"], reason="stale_token"
            )
        else:
            seeds = [
                GrantedSeed(id=f"{100 + n}", url=f"https://b.example/{n}")
                for n in range(body["limit"])
            ]
            reply = SeedsClaimed(request_id=body["request_id"], job_id=body["job_id"], seeds=seeds)
        self.client.on_reply(reply_headers(cid), reply.model_dump_json().encode())


@pytest.fixture
def server() -> SeedServer:
    producer = RecordingProducer()
    client = QuartermasterClient("127.0.0.1:1", request_timeout=1.0)
    client._producer = producer  # type: ignore[assignment]
    seed_server = SeedServer(client, producer)
    seed_server.claims = []
    return seed_server


async def test_claimed_seeds_join_the_jobs_seeds_and_every_result_goes_with_finish(
    server: SeedServer,
) -> None:
    async with server.client.job(site="example", lease_seconds=60) as job:
        assert job.seeds == []
        got = await job.claim_seeds(2)
        assert [s.id for s in got] == ["100", "101"] and job.seeds == got
        job.seed_done("100", ok=False, reason="HTTP 404")
        job.seed_done("100", ok=True, next_due_seconds=60)  # the last word counts
        job.seed_done("101", ok=False, reason="x" * 900)
    assert server.claims[0]["lease_token"] == 5 and server.claims[0]["limit"] == 2
    assert server.claims[0]["lease_secret"] == LEASE_SECRET
    results = server.finish()["seed_results"]
    assert results[0] == {"seed_id": "100", "ok": True, "next_due_seconds": 60, "reason": None}
    assert results[1]["ok"] is False and len(results[1]["reason"]) == 500


async def test_a_claim_answered_lease_lost_raises_and_marks_the_job_lost(
    server: SeedServer,
) -> None:
    server.lost = True
    async with server.client.job(site="example", lease_seconds=60) as job:
        with pytest.raises(LeaseLost, match="stale_token"):
            await job.claim_seeds(3)
        assert job.lost and job.lost_reason == "stale_token"
    assert not [b for _, _, b, _ in server.producer.sent if b["type"] == "job.finish"]
