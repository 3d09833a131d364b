"""The outbox table: the writer's insert (inside the caller's transaction) and the relay's reads."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, SMALLINT, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

NOTIFY_CHANNEL = "qm_outbox"
# classid of the advisory locks the writer takes per key; the relay's shard locks use the other
KEY_LOCK_CLASS = 0x514D
SHARD_LOCK_CLASS = 0x514E


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message to publish: written by ``insert_rows``, read back by the relay."""

    topic: str
    key: bytes | None
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]
    shard: int
    id: int = 0


_LOCK_KEYS_AND_NOTIFY = text(
    """
    -- Per-key order: writers of one key commit in id order, because each holds its key's lock
    -- from before it takes an id until it commits. So a row that took its id first can never
    -- commit after a later row of the same key. Sorted, so two writers cannot deadlock here.
    SELECT count(pg_advisory_xact_lock(:lock_class, h)), pg_notify(:channel, '')
    FROM (SELECT DISTINCT hashtext(encode(k, 'hex')) AS h FROM unnest(:keys) AS k
          WHERE k IS NOT NULL ORDER BY 1) AS sorted
    """
).bindparams(bindparam("keys", type_=ARRAY(BYTEA)))

_INSERT = text(
    """
    INSERT INTO outbox (shard, topic, key, headers, payload)
    SELECT r.shard, r.topic, r.key, r.headers, r.payload
    FROM unnest(:shards, :topics, :keys, CAST(:headers AS jsonb[]), :payloads)
         WITH ORDINALITY AS r(shard, topic, key, headers, payload, n)
    ORDER BY r.n
    """
).bindparams(
    bindparam("shards", type_=ARRAY(SMALLINT)),
    bindparam("topics", type_=ARRAY(TEXT)),
    bindparam("keys", type_=ARRAY(BYTEA)),
    bindparam("headers", type_=ARRAY(TEXT)),
    bindparam("payloads", type_=ARRAY(BYTEA)),
)


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    """Headers as stored: a JSON list of [name, base64 value]."""
    return json.dumps([[name, base64.b64encode(value).decode()] for name, value in headers])


def decode_headers(stored: Sequence[Sequence[str]]) -> list[tuple[str, bytes]]:
    """Headers as Kafka wants them, from the stored JSON list."""
    return [(name, base64.b64decode(value)) for name, value in stored]


async def insert_rows(conn: AsyncConnection, rows: Sequence[OutboxRow]) -> None:
    """Insert ``rows`` in order and NOTIFY the relays; both take effect only if the caller commits."""
    if not rows:
        return
    keys = [row.key for row in rows]
    await conn.execute(
        _LOCK_KEYS_AND_NOTIFY,
        {"lock_class": KEY_LOCK_CLASS, "channel": NOTIFY_CHANNEL, "keys": keys},
    )
    await conn.execute(
        _INSERT,
        {
            "shards": [row.shard for row in rows],
            "topics": [row.topic for row in rows],
            "keys": keys,
            "headers": [encode_headers(row.headers) for row in rows],
            "payloads": [row.payload for row in rows],
        },
    )
