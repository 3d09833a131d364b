"""The claim worker: consumes ``qm.requests`` in a consumer group (``workers.consuming``).

Every record read gets exactly one outcome: a reply, a dead letter, or a retry in place.

Records are pipelined: a consumer hands each one to the processor (``workers.requests``) and reads
on, up to ``QM_WORKER_MAX_IN_FLIGHT`` records in flight. Requests are processed in database
transactions shared with the requests waiting beside them (group commit), a job's requests in
order; a partition's offset is committed only up to its first record whose transaction has not
committed. Records done but not yet committed when the worker crashes are read again; the inbox
knows them by their position and adds no second reply.

Several consumers of the group may run in one process (``QM_WORKER_CONSUMERS``), each on its own
partitions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from workers.consuming import Subscription, pipelined
from workers.requests import RequestProcessor

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()


async def run_claim_worker(wiring: Wiring) -> None:
    """Run the claim worker until ``wiring.stop`` is set."""
    settings = wiring.settings
    db = wiring.database(pre_ping=False)  # a failed request is retried anyway
    processor = RequestProcessor(settings, db, wiring.secrets)
    requests = Subscription(
        settings.topic("requests"), settings.consumer_group, settings.worker_consumers
    )
    try:
        async with pipelined(wiring, requests, processor.submit, settings.worker_max_in_flight):
            log.info(
                "claim_worker_started",
                topic=requests.topic,
                group=requests.group,
                consumers=requests.consumers,
            )
            await wiring.stop.wait()
    finally:
        processor.close()  # records still waiting are read again by the partitions' next owner
        await processor.drain()  # the database closes after this, with the wiring
        log.info("claim_worker_stopped")
