"""The dead letter of a request record that failed for good: built so that building it cannot fail.

A dead letter is the record's key, value and headers plus the ``qm.dlt.*`` headers saying where it
came from and why (``app.dlt``). Its value drops a session state sent in the clear and the lease
secret (``without_secrets``); a value too large to travel inline is kept in
PostgreSQL beside it. Whatever the record holds, building its letter never raises: when the full
letter cannot be made (a value or header nothing expected), the letter falls back to the record's
raw key and value and a minimal header set (original topic, partition, offset and timestamp,
error class, attempts), so the record is settled all the same.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import structlog
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from app.dlt import Origin, dead_letter_headers
from app.dlt.letter_headers import PREFIX, value_ref_headers
from app.kafka_headers import Header
from app.settings import Settings
from app.store import dlt_values
from schemas.nesting import MAX_NESTING, nesting_depth
from workers.consuming import Incoming

log = structlog.get_logger()


@dataclass(frozen=True)
class Letter:
    """A dead letter's value and headers, and its value when it is kept in PostgreSQL instead."""

    value: bytes | None
    headers: list[Header]
    stored: dlt_values.StoredValue | None = None


def letter(
    record: Incoming, error: BaseException, attempts: int, message: str, settings: Settings
) -> Letter:
    """The record's dead letter: the full one, or, when that cannot be made, the raw one."""
    try:
        return full_letter(record, error, attempts, message, settings)
    except Exception as exc:  # noqa: BLE001 - a record is settled whatever it holds
        log.error(
            "dead_letter_fallback",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(exc).__name__,
        )
        return raw_letter(record, error, attempts, settings)


def full_letter(
    record: Incoming, error: BaseException, attempts: int, message: str, settings: Settings
) -> Letter:
    """The record's headers followed by the ``qm.dlt.*`` ones; its value without a session state
    in the clear. A value too large to travel inline is left out, referenced by a header."""
    origin = Origin(
        record.topic, record.partition, record.offset, record.timestamp_ms, settings.consumer_group
    )
    headers = dead_letter_headers(record.headers, origin, error, attempts, message=message)
    # neither a session state sent in the clear nor a lease secret reaches the dead-letter topic
    # or its table; a value nested deeper than any request is not one (and a parser might not
    # survive reading it)
    kept = None if record.value is None else without_secrets(record.value)
    return _inline_or_stored(record.key, kept, headers, settings)


def raw_letter(record: Incoming, error: BaseException, attempts: int, settings: Settings) -> Letter:
    """The record's raw key and value with the fewest headers that say where it came from and
    why: nothing here reads the record's bytes, so nothing here fails on them."""
    ours = {
        "original_topic": record.topic,
        "original_partition": str(record.partition),
        "original_offset": str(record.offset),
        "original_timestamp": str(record.timestamp_ms),
        "error_class": f"{type(error).__module__}.{type(error).__qualname__}",
        "attempts": str(attempts),
    }
    headers: list[Header] = [(PREFIX + name, value.encode()) for name, value in ours.items()]
    value = None if record.value is None else withhold_lease_secret(record.value)
    return _inline_or_stored(record.key, value, headers, settings)


def _inline_or_stored(
    key: bytes | None, value: bytes | None, headers: list[Header], settings: Settings
) -> Letter:
    if value is None or record_size(key, value, headers) <= settings.dlt_inline_max_bytes:
        return Letter(value, headers)
    stored = dlt_values.StoredValue.of(value)
    return Letter(None, headers + value_ref_headers(stored.ref, value), stored)


def record_size(key: bytes | None, value: bytes | None, headers: list[Header]) -> int:
    """Bytes of a record in a batch, plus room for the outbox's own id header."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers) + 128


def readable_ids(raw: bytes | None) -> dict[str, str]:
    """request_id and job_id of a bad record, when they can be read as short strings (and as
    text a reply can carry: no NUL)."""
    if raw is None or nesting_depth(raw) > MAX_NESTING:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(body, dict):
        return {}
    return {
        name: value
        for name in ("request_id", "job_id")
        if isinstance(value := body.get(name), str)
        and 0 < len(value) <= 200
        and "\x00" not in value
    }


CLEAR_SESSION_FIELDS = ("storage_state", "session_state")
SEALED_TEXT = re.compile(r"[A-Za-z0-9+/]+={0,2}")  # base64: what a sealed box looks like
WITHHELD = "[withheld: a session state must travel sealed]"
# the capability of a live lease: whoever reads the dead-letter topic must not be able to act on it
LEASE_SECRET = "lease_secret"
WITHHELD_LEASE_SECRET = "[withheld]"
# the same, on bytes that are not parsed (too deep, or not JSON): a regular expression cannot fail
_LEASE_SECRET_TEXT = re.compile(rb'("lease_secret"\s*:\s*)"[^"\\]*"')


def withhold_lease_secret(raw: bytes) -> bytes:
    """``raw`` with the text of any ``"lease_secret": "…"`` pair replaced, without parsing it."""
    return _LEASE_SECRET_TEXT.sub(rb'\1"' + WITHHELD_LEASE_SECRET.encode() + rb'"', raw)


def without_secrets(raw: bytes) -> bytes:
    """A request record fit for a dead-letter topic: a session state sent in the clear (not a
    sealed string, as an old or broken collector might send) and a lease secret are replaced, so
    the dead letter holds neither cookies nor a capability. Anything else, sealed states
    included, is kept byte for byte; a record without either is kept as it came. A value nested
    deeper than any request, or not JSON, is not parsed (a parser might not survive it): only its
    lease secret's text is withheld."""
    if nesting_depth(raw) > MAX_NESTING:
        return withhold_lease_secret(raw)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # not a request: kept as it came
        return withhold_lease_secret(raw)
    if not isinstance(body, dict):
        return raw
    withheld = {
        name: WITHHELD
        for name in CLEAR_SESSION_FIELDS
        if body.get(name) is not None
        and not (isinstance(body[name], str) and SEALED_TEXT.fullmatch(body[name]))
    }
    if body.get(LEASE_SECRET) is not None:
        withheld[LEASE_SECRET] = WITHHELD_LEASE_SECRET
    if not withheld:
        return raw
    return json.dumps({**body, **withheld}).encode()
