"""`job.submit_capture` through the SDK, the real claim worker and relay over real Kafka."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.kafka import sdk_client
from app.sdk import LeaseLost, RequestConflict
from app.settings import Settings
from tests.integration.conftest_outbox import running_relays
from tests.support.captures import capture_body, capture_row
from tests.support.leasing import make_site, scalar
from tests.support.processes import QmProcess


async def test_submit_capture_is_accepted_idempotent_and_refuses_a_conflict_or_a_stale_token(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await make_site(engine, settings)
    body = capture_body("cap-1")
    with QmProcess(settings, "worker"):
        async with (
            running_relays(settings, 1),
            sdk_client(settings) as client,
            client.job(site="board", wait_seconds=30, timeout=60) as job,
        ):
            assert await job.submit_capture(**body) == "cap-1"
            assert await job.submit_capture(**body) == "cap-1"  # the same capture again
            with pytest.raises(RequestConflict):
                await job.submit_capture(**{**body, "size": 1})
            stale = job._granted().model_copy(update={"lease_token": job.lease_token + 1000})
            job._grant = stale  # a zombie holding an old token
            with pytest.raises(LeaseLost, match="stale_token"):
                await job.submit_capture(**{**body, "capture_id": "cap-2"})
    assert (await capture_row(engine, "cap-1"))["size"] == 1234
    assert await scalar(engine, "SELECT count(*) FROM captures") == 1
