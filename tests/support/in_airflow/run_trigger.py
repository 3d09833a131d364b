"""Runs the Kafka provider's real trigger in Airflow's environment and prints every event it fires.

Run with the Airflow virtual environment's python (never Quartermaster's), with ``PYTHONPATH`` at the
repository root so the trigger can import ``app.airflow``, and the broker as an Airflow connection
(``AIRFLOW_CONN_<ID>``). The one argument is a JSON object:

    {"trigger": "await" | "queue", "fires": N, "topics": [...], "apply_function": "app.airflow.…",
     "apply_function_kwargs": {...}, "kafka_config_id": "…", "timeout": seconds}

``await`` is ``AwaitMessageTrigger`` (what ``AwaitMessageSensor`` defers to); ``queue`` is the common
``MessageQueueTrigger`` with ``scheme="kafka"`` (what an ``AssetWatcher`` runs). Like the triggerer,
it runs the trigger again after each event, ``fires`` times. Each event is printed as one JSON line
``{"event": payload}``; ``{"timeout": true}`` and exit status 3 if the events do not come in time.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


def make_trigger(spec: dict[str, Any]) -> Any:
    options = {
        "topics": spec["topics"],
        "apply_function": spec["apply_function"],
        "apply_function_kwargs": spec.get("apply_function_kwargs", {}),
        "kafka_config_id": spec["kafka_config_id"],
        "poll_timeout": 0.5,
        "poll_interval": spec.get("poll_interval", 0.1),
    }
    if spec["trigger"] == "queue":
        from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

        return MessageQueueTrigger(scheme="kafka", **options)
    from airflow.providers.apache.kafka.triggers.await_message import AwaitMessageTrigger

    return AwaitMessageTrigger(**options)


async def fire_once(spec: dict[str, Any]) -> Any:
    trigger = make_trigger(spec)
    try:
        async for event in trigger.run():
            return event.payload
    finally:
        # MessageQueueTrigger runs the provider's trigger inside it; that one owns the consumer
        await getattr(trigger, "trigger", trigger).cleanup()
    return None


async def main(spec: dict[str, Any]) -> int:
    try:
        async with asyncio.timeout(spec.get("timeout", 60)):
            for _ in range(spec.get("fires", 1)):
                print(json.dumps({"event": await fire_once(spec)}), flush=True)
    except TimeoutError:
        print(json.dumps({"timeout": True}), flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
