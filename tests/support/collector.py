"""A collector process for chaos tests: takes a lease, says so, then works until it is killed.

Run as ``python -m tests.support.collector SITE JOB_ID LEASE_SECONDS`` with the QM_* environment.
"""

from __future__ import annotations

import asyncio
import sys

from app.kafka import sdk_client
from app.settings import Settings


async def main(site: str, job_id: str, lease_seconds: int) -> None:
    async with (
        sdk_client(Settings()) as client,
        client.job(site=site, job_id=job_id, lease_seconds=lease_seconds, wait_seconds=60) as job,
    ):
        print(f"granted {job.lease_token}", flush=True)
        await asyncio.Event().wait()  # works until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
