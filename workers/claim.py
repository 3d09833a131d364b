"""The claim worker: consumes ``qm.requests`` in a consumer group (``workers.consuming``).

Every record read gets exactly one outcome: a reply, a dead letter, or a retry in place.

Each request is processed in a database transaction (shared with the requests that arrive beside
it: the group commit of ``workers.requests``); the Kafka offset is committed only after that
transaction committed (a handler interrupted before it finished is not acknowledged and the record
is read again). Records done but not yet committed when the worker crashes are read again and
answered from the inbox.

Several consumers of the group run in one process (``QM_WORKER_CONSUMERS``), each on its own
partitions, each handling its records in order, so requests of one job stay in order.
"""

from __future__ import annotations

import structlog

from app.wiring import Wiring
from workers.consuming import Subscription, pipelined
from workers.requests import RequestProcessor

log = structlog.get_logger()


async def run_claim_worker(wiring: Wiring) -> None:
    """Run the claim worker until ``wiring.stop`` is set."""
    settings = wiring.settings
    db = wiring.database(pre_ping=False)  # a failed request is retried anyway
    processor = RequestProcessor(settings, db)
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
