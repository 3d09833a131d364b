"""The relay process: owns outbox shards and publishes their rows (``app.outbox.relay``) until
stopped. Run it in as many replicas as wanted; they share the shards fairly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.outbox.relay import Relay

if TYPE_CHECKING:
    from app.root import Wiring


async def run_relay(wiring: Wiring) -> None:
    """Run the relay until ``wiring.stop`` is set (the entry point of `qm relay` and `qm run all`)."""
    db = wiring.database(pool_size=1)  # the shard-owning session, and the readiness ping
    wiring.needs_kafka()
    await Relay(wiring.settings, engine=db.engine).run(wiring.stop)
