"""Runs once per capture of the site ``board`` that Quartermaster handed off (event-driven scheduling).

An ``AssetWatcher`` runs the Kafka ``MessageQueueTrigger`` in the triggerer on ``qm.captures.ready``
with Quartermaster's ``app.airflow.capture_ready``: every ``capture.ready`` record of the site becomes
an asset event whose ``extra["payload"]`` holds the capture's fields, and the event schedules this DAG.
The connection ``qm_kafka_captures`` names the broker and this watcher's own consumer group.

A copy of a record the relay published twice (same ``qm.message_id``) fires nothing, so it makes
no second run; Airflow itself gives an asset-scheduled run no id of ours to refuse a repeat with
(the handoff DAG ``qm_capture_handoff`` has one: ``qm-<capture_id>``). See docs/airflow.md.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import DAG, Asset, AssetWatcher, task

TOPIC = os.environ.get("QM_TOPIC_PREFIX", "qm.") + "captures.ready"

board_captures = Asset(
    "qm_board_captures",
    watchers=[
        AssetWatcher(
            name="qm_board_captures_watcher",
            trigger=MessageQueueTrigger(
                scheme="kafka",
                topics=[TOPIC],
                kafka_config_id="qm_kafka_captures",
                apply_function="app.airflow.capture_ready",
                apply_function_kwargs={"site": "board", "content_type": "text/html"},
                poll_interval=0.05,  # the trigger pauses this long after every other record
            ),
        )
    ],
)

with DAG(dag_id="qm_board_captures", schedule=[board_captures], tags=["quartermaster"]):

    @task
    def process(triggering_asset_events: Any = None) -> list[str]:
        """Each capture of the run: its fields are the asset event's payload."""
        captures = [
            event.extra["payload"]
            for events in (triggering_asset_events or {}).values()
            for event in events
        ]
        for capture in captures:
            print(
                f"capture {capture['capture_id']} of {capture['url']} at {capture['storage_uri']}"
            )
        return [capture["capture_id"] for capture in captures]

    process()
