"""The outbox table: the writer's insert (inside the caller's transaction) and the relay's reads."""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, INTEGER, SMALLINT, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.dlt_values import StoredValue
from app.store.prepared import Prepared

NOTIFY_CHANNEL = "qm_outbox"
# the third item of a stored header whose name is in base64 (it holds a NUL, which jsonb cannot)
NAME_IN_BASE64 = "name:base64"
# classid of the advisory locks the writer takes per key; the relay's shard locks use the other
KEY_LOCK_CLASS = 0x514D
SHARD_LOCK_CLASS = 0x514E


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One message to publish: written by ``insert_rows``, read back by the relay."""

    topic: str
    key: bytes | None
    payload: bytes | None  # None: the record's value is null
    headers: tuple[tuple[str, bytes | None], ...]
    shard: int
    id: int = 0
    partition: int | None = None  # None: the key picks it (Kafka's default partitioner)


_INSERT = Prepared(
    text(
        """
        WITH locks AS MATERIALIZED (
            -- Per-key order: writers of one key commit in id order, because each holds its key's
            -- lock from before it takes an id until it commits. So a row that took its id first can
            -- never commit after a later row of the same key. Sorted, so two writers cannot deadlock
            -- here. The insert below joins this one-row CTE, so every lock is held before the first
            -- id is drawn.
            SELECT count(pg_advisory_xact_lock(:lock_class, h)) AS held, pg_notify(:channel, '')
            FROM (SELECT DISTINCT hashtext(encode(k, 'hex')) AS h FROM unnest(:keys) AS k
                  WHERE k IS NOT NULL ORDER BY 1) AS sorted
        ),
        replies AS (
            -- the inbox keeps the reply each request got, to answer a redelivery the same way
            UPDATE inbox i SET reply_topic = r.topic, reply = r.reply
            FROM unnest(:reply_ids, :reply_topics, CAST(:replies AS jsonb[])) AS r(id, topic, reply)
            WHERE i.request_id = CAST(r.id AS uuid)
        )
        INSERT INTO outbox (shard, topic, key, headers, payload, partition)
        SELECT r.shard, r.topic, r.key, r.headers, r.payload, r.partition
        FROM locks, unnest(:shards, :topics, :keys, CAST(:headers AS jsonb[]), :payloads,
                           :partitions)
             WITH ORDINALITY AS r(shard, topic, key, headers, payload, partition, n)
        ORDER BY r.n
        """
    ).bindparams(
        bindparam("shards", type_=ARRAY(SMALLINT)),
        bindparam("topics", type_=ARRAY(TEXT)),
        bindparam("keys", type_=ARRAY(BYTEA)),
        bindparam("headers", type_=ARRAY(TEXT)),
        bindparam("payloads", type_=ARRAY(BYTEA)),
        bindparam("partitions", type_=ARRAY(INTEGER)),
        bindparam("reply_ids", type_=ARRAY(TEXT)),
        bindparam("reply_topics", type_=ARRAY(TEXT)),
        bindparam("replies", type_=ARRAY(TEXT)),
    )
)


@dataclass(frozen=True, slots=True)
class InboxReply:
    """The reply a request got, kept in its inbox row by the same statement that sends it."""

    request_id: str
    topic: str
    reply: dict[str, Any]


def encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> str:
    """Headers as stored: a JSON list of [name, base64 value or null], in their order. A name
    that jsonb text cannot hold (one with a NUL) is stored in base64, marked by a third item."""
    return json.dumps([_stored_header(name, value) for name, value in headers])


def _stored_header(name: str, value: bytes | None) -> list[str | None]:
    encoded = None if value is None else _b64(value)
    if "\x00" in name:
        return [_b64(name.encode()), encoded, NAME_IN_BASE64]
    return [name, encoded]


def decode_headers(stored: Sequence[Sequence[str | None]]) -> list[tuple[str, bytes | None]]:
    """Headers as Kafka wants them, from the stored JSON list."""
    return [
        (
            base64.b64decode(entry[0] or "").decode() if len(entry) > 2 else str(entry[0]),
            None if entry[1] is None else base64.b64decode(entry[1]),
        )
        for entry in stored
    ]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def insert_rows(
    conn: AsyncConnection, rows: Sequence[OutboxRow], replies: Sequence[InboxReply] = ()
) -> None:
    """Insert ``rows`` in order, NOTIFY the relays and keep ``replies`` in the inbox: one
    statement, which takes effect only if the caller commits."""
    if not rows:
        if replies:
            raise ValueError("an inbox reply is kept only with the outbox row that sends it")
        return
    await _INSERT.execute(
        conn,
        {
            "lock_class": KEY_LOCK_CLASS,
            "channel": NOTIFY_CHANNEL,
            "shards": [row.shard for row in rows],
            "topics": [row.topic for row in rows],
            "keys": [row.key for row in rows],
            "headers": [encode_headers(row.headers) for row in rows],
            "payloads": [row.payload for row in rows],
            "partitions": [row.partition for row in rows],
            "reply_ids": [reply.request_id for reply in replies],
            "reply_topics": [reply.topic for reply in replies],
            "replies": [json.dumps(reply.reply, default=str) for reply in replies],
        },
    )


# --- the relay's side -----------------------------------------------------------------------
# A relay owns shards through session-level advisory locks held on its one dedicated
# connection, named RELAY_APPLICATION_NAME so relays can count each other.

RELAY_APPLICATION_NAME = "qm-relay"


@dataclass(frozen=True, slots=True)
class UnsentRow:
    """A committed outbox row as the relay reads it, with its age by the database's clock."""

    id: int
    shard: int
    topic: str
    key: bytes | None
    headers: list[tuple[str, bytes | None]]  # a list, as the Kafka client's record builder wants
    payload: bytes | None
    age_seconds: float
    attempts: int = 0  # failed tries so far
    partition: int | None = None  # the partition it asks for; None: its key's


@dataclass(frozen=True, slots=True)
class Backlog:
    """Rows waiting in the outbox and the age of the oldest; parked rows apart."""

    rows: int
    oldest_age_seconds: float
    parked: int = 0


_PREPARE_RELAY_SESSION = text(
    """
    -- The name lets relays count each other. The relay's only writes are deletes of rows the
    -- broker already acked: losing one in a crash just publishes the row again (a duplicate,
    -- which consumers drop), so they need not wait for the WAL flush.
    -- No bitmap scans: the outbox holds far more deleted rows than live ones between two
    -- autovacuums (a minute of traffic), and a bitmap scan visits every one of them on every
    -- read, where an index scan marks the entries it passes dead and the next read skips them.
    SELECT set_config('application_name', :name, false),
           set_config('synchronous_commit', 'off', false),
           set_config('enable_bitmapscan', 'off', false)
    """
)

_COUNT_RELAYS = text(
    """
    SELECT count(*) FROM pg_stat_activity
    WHERE application_name = :name AND datname = current_database()
    """
)

_TRY_LOCK_SHARDS = text(
    """
    -- Takes every free shard of the list; the caller releases what it does not want.
    SELECT s FROM unnest(CAST(:shards AS integer[])) AS s
    WHERE pg_try_advisory_lock(:lock_class, s)
    ORDER BY s
    """
)

_UNLOCK_SHARDS = text(
    """
    SELECT count(*) FILTER (WHERE pg_advisory_unlock(:lock_class, s))
    FROM unnest(CAST(:shards AS integer[])) AS s
    """
)

_SHARD_LOCKS = text(
    """
    SELECT objid::integer AS shard, pid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = :lock_class AND objsubid = 2 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ORDER BY 1
    """
)

_FETCH_UNSENT = text(
    """
    -- The oldest rows of each shard, in id order, up to :limit per shard. Topics that
    -- cannot be published right now are passed over so their rows do not block the shard;
    -- parked rows (refused for good) are never read again.
    -- Headers come back decoded, as parallel arrays of names and values (bytes both).
    -- Rows of rounds still in flight (:busy) are passed over: a multirange, so each row read
    -- is checked by a binary search, not against every id in flight.
    WITH busy AS MATERIALIZED (
        SELECT coalesce(range_agg(int8range(b, b, '[]')), '{}') AS ids
        FROM unnest(CAST(:busy AS bigint[])) AS b
    )
    SELECT o.id, o.shard, o.topic, o.key, o.payload, o.attempts, o.partition,
           extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS age_seconds,
           ARRAY(SELECT CASE WHEN jsonb_array_length(h) > 2 THEN decode(h ->> 0, 'base64')
                             ELSE convert_to(h ->> 0, 'UTF8') END
                 FROM jsonb_array_elements(o.headers) WITH ORDINALITY AS e(h, n)
                 ORDER BY n) AS header_names,
           ARRAY(SELECT decode(h ->> 1, 'base64')
                 FROM jsonb_array_elements(o.headers) WITH ORDINALITY AS e(h, n)
                 ORDER BY n) AS header_values
    FROM busy, unnest(CAST(:shards AS smallint[])) AS s(shard)
    CROSS JOIN LATERAL (
        SELECT id, shard, topic, key, headers, payload, attempts, partition, created_at
        FROM outbox
        WHERE outbox.shard = s.shard AND outbox.topic <> ALL(:skip_topics)
          AND outbox.parked_at IS NULL AND NOT busy.ids @> outbox.id
        ORDER BY outbox.id
        LIMIT :limit
    ) AS o
    ORDER BY o.shard, o.id
    """
).bindparams(bindparam("skip_topics", type_=ARRAY(TEXT)))

# by id and the topic it was sent to: a row `qm outbox retry` sent back to its original topic
# meanwhile is a new send, not the one acknowledged
_DELETE_ROWS = text(
    """
    DELETE FROM outbox
    WHERE (id, topic) IN (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:topics AS text[])))
    """
)

_BACKLOG = text(
    """
    SELECT count(*) FILTER (WHERE parked_at IS NULL) AS rows,
           coalesce(extract(epoch FROM clock_timestamp()
                    - min(created_at) FILTER (WHERE parked_at IS NULL)), 0)::float8 AS age,
           count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked
    FROM outbox
    """
)

_COUNT_FAILURE = text(
    """
    -- One more failed try of each row, unless it was deleted or parked meanwhile.
    UPDATE outbox SET attempts = attempts + 1
    WHERE id = ANY(CAST(:ids AS bigint[])) AND parked_at IS NULL
    RETURNING id, attempts
    """
)

_DEAD_LETTER_ROW = text(
    """
    -- A row the broker refused for good becomes a dead letter in place: it keeps its id (so
    -- its shard's order holds) and goes to the dead-letter topic on the relay's next round.
    -- A value too large for any message moves to dlt_values in the same statement.
    WITH stored AS (
        INSERT INTO dlt_values (id, sha256, value)
        SELECT CAST(:ref AS uuid), CAST(:sha256 AS text), payload FROM outbox
        WHERE id = :id AND topic = :topic AND parked_at IS NULL AND :by_reference
          AND payload IS NOT NULL
    )
    -- The dead-letter topic has partitions of its own: the key picks one, as for any row.
    UPDATE outbox
    SET topic = :dlt_topic, headers = CAST(:headers AS jsonb), attempts = 0, partition = NULL,
        payload = CASE WHEN :by_reference THEN NULL ELSE payload END
    WHERE id = :id AND topic = :topic AND parked_at IS NULL
    RETURNING id
    """
)

_PARK_ROWS = text(
    """
    -- Refused for good, and so was its dead letter: kept for an operator, never read again.
    UPDATE outbox SET parked_at = now()
    WHERE id = ANY(CAST(:ids AS bigint[])) AND parked_at IS NULL
    RETURNING id
    """
)


async def prepare_relay_session(conn: AsyncConnection, name: str = RELAY_APPLICATION_NAME) -> None:
    """Name the session (pg_stat_activity shows it) and let its deletes commit asynchronously."""
    await conn.execute(_PREPARE_RELAY_SESSION, {"name": name})


async def count_relays(conn: AsyncConnection, name: str = RELAY_APPLICATION_NAME) -> int:
    """Sessions of this database named ``name``: the live relays, the caller included."""
    return int((await conn.execute(_COUNT_RELAYS, {"name": name})).scalar_one())


async def lock_shards(conn: AsyncConnection, shards: Sequence[int]) -> list[int]:
    """Try the session lock of each shard; returns those now held (the others are owned elsewhere)."""
    if not shards:
        return []
    result = await conn.execute(
        _TRY_LOCK_SHARDS, {"shards": list(shards), "lock_class": SHARD_LOCK_CLASS}
    )
    return [int(shard) for shard in result.scalars()]


async def unlock_shards(conn: AsyncConnection, shards: Sequence[int]) -> int:
    """Release the session locks of ``shards``; returns how many were held."""
    if not shards:
        return 0
    result = await conn.execute(
        _UNLOCK_SHARDS, {"shards": list(shards), "lock_class": SHARD_LOCK_CLASS}
    )
    return int(result.scalar_one())


async def shard_owners(conn: AsyncConnection) -> dict[int, int]:
    """Every locked shard of this database and the backend pid of the relay holding it."""
    result = await conn.execute(_SHARD_LOCKS, {"lock_class": SHARD_LOCK_CLASS})
    return {int(row.shard): int(row.pid) for row in result}


async def fetch_unsent(
    conn: AsyncConnection,
    shards: Sequence[int],
    limit: int,
    skip_topics: Sequence[str] = (),
    busy: Collection[int] = (),
) -> list[UnsentRow]:
    """The committed rows of ``shards``, oldest first, at most ``limit`` per shard, passing
    over the ids in ``busy`` (rows already on their way)."""
    if not shards:
        return []
    result = await conn.execute(
        _FETCH_UNSENT,
        {
            "shards": list(shards),
            "limit": limit,
            "skip_topics": list(skip_topics),
            "busy": list(busy),
        },
    )
    return [
        UnsentRow(
            id_,
            shard,
            topic,
            key,
            [(bytes(name).decode(), value) for name, value in zip(names, values, strict=True)],
            payload,
            age,
            attempts,
            partition,
        )
        for id_, shard, topic, key, payload, attempts, partition, age, names, values in result
    ]


async def delete_rows(conn: AsyncConnection, sent: Sequence[tuple[int, str]]) -> int:
    """Delete published rows, each by its id and the topic it was published to; returns how
    many were still there as they were sent."""
    if not sent:
        return 0
    ids, topics = zip(*sent, strict=True)
    result = await conn.execute(_DELETE_ROWS, {"ids": list(ids), "topics": list(topics)})
    return int(result.rowcount)


_VACUUM = text(
    """
    -- The relay deletes every row it publishes: between two autovacuums (the server's naptime,
    -- a minute by default) the dead rows pile up at the head of each shard's index range, where
    -- every read starts. SKIP_LOCKED: another relay's vacuum of the table is as good.
    -- TRUNCATE false: truncating the empty tail takes an ACCESS EXCLUSIVE lock, which every
    -- business transaction writing the outbox would queue behind.
    VACUUM (SKIP_LOCKED, TRUNCATE false) outbox
    """
)


async def vacuum_outbox(conn: AsyncConnection) -> None:
    """Vacuum the outbox table now (``conn`` in autocommit; without the table's ownership the
    server only warns)."""
    await conn.execute(_VACUUM)


async def backlog(conn: AsyncConnection) -> Backlog:
    """How many rows wait in the whole outbox and how old the oldest is (parked rows apart)."""
    row = (await conn.execute(_BACKLOG)).one()
    return Backlog(rows=int(row.rows), oldest_age_seconds=float(row.age), parked=int(row.parked))


async def count_failures(conn: AsyncConnection, ids: Sequence[int]) -> dict[int, int]:
    """Count one more failed try of each row; returns each row's tries so far."""
    if not ids:
        return {}
    result = await conn.execute(_COUNT_FAILURE, {"ids": list(ids)})
    return {int(row.id): int(row.attempts) for row in result}


async def dead_letter_row(
    conn: AsyncConnection,
    row: UnsentRow,
    dlt_topic: str,
    headers: Sequence[tuple[str, bytes | None]],
    stored: StoredValue | None = None,
) -> bool:
    """Turn ``row`` (still on ``row.topic``, not parked) into a dead letter on ``dlt_topic``;
    with ``stored``, its payload moves to ``dlt_values``. False when the row was gone."""
    result = await conn.execute(
        _DEAD_LETTER_ROW,
        {
            "id": row.id,
            "topic": row.topic,
            "dlt_topic": dlt_topic,
            "headers": encode_headers(headers),
            "by_reference": stored is not None,
            "ref": stored.ref if stored is not None else None,
            "sha256": stored.sha256 if stored is not None else None,
        },
    )
    return result.first() is not None


async def park_rows(conn: AsyncConnection, ids: Sequence[int]) -> list[int]:
    """Park rows for good: the relay reads them no more. Returns the ids it parked."""
    if not ids:
        return []
    result = await conn.execute(_PARK_ROWS, {"ids": list(ids)})
    return [int(id_) for id_ in result.scalars()]
