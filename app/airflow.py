"""Apply functions for Airflow's Kafka sensors and triggers, shipped with Quartermaster.

The Kafka provider's ``AwaitMessageSensor`` / ``AwaitMessageTrigger`` and Airflow 3's ``AssetWatcher``
(with the provider's ``MessageQueueTrigger``) call an apply function, named by its dotted path, on every
record they read: a truthy return fires the trigger with that value as its event payload, ``None`` lets
it read on. The functions here take the record as the provider hands it over (a confluent-kafka
``Message``: ``.value()`` returns bytes), never raise on a foreign or malformed record, and import only
the standard library, so an Airflow environment can install them without Quartermaster's server side.

- ``job_finished``: on ``qm.job-events``, the terminal event of the job named in its kwargs.
- ``capture_ready``: on ``qm.captures.ready``, a capture of the site named in its kwargs (and optional
  filters), with the fields a triggered DAG needs; a copy of a record it already fired for (the relay
  publishes a record again when the broker's ack was lost) is dropped by its ``qm.message_id``.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

# The header the outbox stamps on every record it publishes (app.outbox.writer.MESSAGE_ID, named
# again here because this module imports nothing of the server side); a copy the relay publishes
# again carries the same one.
MESSAGE_ID_HEADER = "qm.message_id"
# how many fired records one triggerer process remembers, to know their copies
SEEN_CAPACITY = 4096

# terminal job event type -> the outcome a DAG branches on
JOB_OUTCOMES: dict[str, str] = {
    "job.succeeded": "succeeded",
    "job.failed": "failed",
    "job.cancelled": "cancelled",
    "job.expired": "expired",
    "job.timed_out": "timed_out",
}

# the fields of a capture.ready record a triggered DAG receives
CAPTURE_FIELDS: tuple[str, ...] = (
    "capture_id",
    "job_id",
    "site",
    "url",
    "storage_uri",
    "sha256",
    "content_type",
    "size",
    "captured_at",
    "handed_off_at",
    "meta",
)


# where a record was read: (topic, partition, offset), or None when the message does not say
Where = tuple[object, object, object] | None


class SeenMessages:
    """The message ids of the records that fired, each with where it was read; the least recently
    seen are forgotten past ``capacity``. Safe to share between the triggers of one process."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._where: OrderedDict[str, Where] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, message_id: str, where: Where) -> bool:
        """Whether this is the first copy of ``message_id`` (and remember it), False for a copy.

        The same record read again at the same place (another watcher's consumer group on the
        same topic) is not a copy: each watcher fires for it once. A relay copy is read at
        another offset.
        """
        with self._lock:
            if message_id in self._where:
                self._where.move_to_end(message_id)
                seen = self._where[message_id]
                return where is not None and seen == where
            self._where[message_id] = where
            while len(self._where) > self.capacity:
                self._where.popitem(last=False)
            return True


SEEN = SeenMessages()


def record_of(message: Any) -> dict[str, Any] | None:
    """The record's JSON object, or None for anything else (no value, not JSON, not an object)."""
    try:
        raw = message.value() if callable(getattr(message, "value", None)) else message
        data = json.loads(raw)
    except Exception:  # noqa: BLE001 - a foreign record of any shape is "not ours", never an error
        return None
    return data if isinstance(data, dict) else None


def job_finished(message: Any, job_id: str | None = None) -> dict[str, Any] | None:
    """The terminal event of ``job_id`` as a small dict, or None for every other record.

    The result's ``outcome`` is one of succeeded, failed, cancelled, expired, timed_out and
    ``succeeded`` is a bool, so a DAG can branch on either.
    """
    record = record_of(message)
    if record is None or not job_id or record.get("job_id") != job_id:
        return None
    outcome = JOB_OUTCOMES.get(str(record.get("type")))
    if outcome is None:
        return None
    return {
        "job_id": job_id,
        "outcome": outcome,
        "succeeded": outcome == "succeeded",
        "status": record.get("status"),
        "site": record.get("site"),
        "collector": record.get("collector"),
        "finished_at": record.get("finished_at"),
    }


def capture_ready(
    message: Any,
    site: str | None = None,
    content_type: str | None = None,
    url_prefix: str | None = None,
    job_id: str | None = None,
) -> dict[str, Any] | None:
    """A ``capture.ready`` record of ``site`` (and the optional filters) as a DAG's conf, else None.

    ``content_type`` matches the media type without parameters (``text/html`` matches
    ``text/html; charset=utf-8``); ``url_prefix`` matches the start of the captured URL. A copy
    of a record that fired in this process (same ``qm.message_id``, read at another offset) is
    None, so a record the relay published twice triggers one DAG run.
    """
    record = record_of(message)
    if record is None or record.get("type") != "capture.ready":
        return None
    if not isinstance(record.get("capture_id"), str) or not record["capture_id"]:
        return None
    if site is not None and record.get("site") != site:
        return None
    if job_id is not None and record.get("job_id") != job_id:
        return None
    if content_type is not None and media_type(record.get("content_type")) != content_type.lower():
        return None
    if url_prefix is not None and not str(record.get("url", "")).startswith(url_prefix):
        return None
    message_id = message_id_of(message)
    if message_id is not None and not SEEN.first(message_id, where_of(message)):
        return None  # a copy of a record this process fired for: the DAG ran for it already
    return {name: record[name] for name in CAPTURE_FIELDS if name in record}


def message_id_of(message: Any) -> str | None:
    """The record's ``qm.message_id`` header, or None (no headers, no such header, not UTF-8)."""
    try:
        headers = message.headers() or []
        for name, value in headers:
            if name == MESSAGE_ID_HEADER and isinstance(value, bytes):
                return value.decode()
    except Exception:  # noqa: BLE001 - a record without a readable id is never taken for a copy
        return None
    return None


def where_of(message: Any) -> Where:
    """(topic, partition, offset) of the record, or None when the message does not say."""
    try:
        return (message.topic(), message.partition(), message.offset())
    except Exception:  # noqa: BLE001 - then any second sighting of its id counts as a copy
        return None


def media_type(value: object) -> str:
    """``text/html; charset=utf-8`` -> ``text/html``; anything not a string -> ``""``."""
    return value.split(";", 1)[0].strip().lower() if isinstance(value, str) else ""
