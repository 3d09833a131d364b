"""The outbox rows an operator looks after: parked, refused (tries spent) or dead letters still in
the table; listed, and sent again by one conditional UPDATE (`qm outbox ls|retry`)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store import Row
from app.store.outbox import NOTIFY_CHANNEL

PARKED, REFUSED, DEAD_LETTER = "parked", "refused", "dead letter"
STATES = (PARKED, REFUSED, DEAD_LETTER)

# The columns both statements read of a row: where it goes now, the state an operator sees it
# in and, for a row the relay rewrote into a dead letter on the outbox's dead-letter topic, where
# it was going and why it was refused (the qm.dlt.* headers the relay wrote, all UTF-8 text).
# Dead letters of other topics that the outbox carries keep those headers to themselves.
_STUCK = """
    WITH stuck AS (
        SELECT o.id, o.shard, o.topic, o.partition, o.key, o.attempts, o.created_at,
               o.parked_at, octet_length(o.payload) AS value_bytes, o.headers,
               CASE WHEN o.parked_at IS NOT NULL THEN 'parked'
                    WHEN o.topic = :dlt_topic THEN 'dead letter'
                    ELSE 'refused' END AS state,
               h.original_topic, h.original_partition, h.error_class, h.dlt_attempts,
               h.value_ref
        FROM outbox o
        CROSS JOIN LATERAL (
            SELECT max(v) FILTER (WHERE n = 'qm.dlt.original_topic') AS original_topic,
                   max(v) FILTER (WHERE n = 'qm.dlt.original_partition') AS original_partition,
                   max(v) FILTER (WHERE n = 'qm.dlt.error_class') AS error_class,
                   max(v) FILTER (WHERE n = 'qm.dlt.attempts') AS dlt_attempts,
                   max(v) FILTER (WHERE n = 'qm.dlt.value_ref') AS value_ref
            FROM (SELECT e.h ->> 0 AS n,
                         convert_from(decode(e.h ->> 1, 'base64'), 'UTF8') AS v
                  FROM jsonb_array_elements(o.headers) AS e(h)
                  WHERE o.topic = :dlt_topic AND jsonb_array_length(e.h) = 2
                    AND e.h ->> 0 IN ('qm.dlt.original_topic', 'qm.dlt.original_partition',
                                      'qm.dlt.error_class', 'qm.dlt.attempts',
                                      'qm.dlt.value_ref')
                    AND e.h ->> 1 IS NOT NULL) AS dlt
        ) AS h
        WHERE (o.parked_at IS NOT NULL OR o.attempts > 0 OR o.topic = :dlt_topic)
          AND (CAST(:ids AS bigint[]) IS NULL OR o.id = ANY(CAST(:ids AS bigint[])))
          AND (CAST(:topics AS text[]) IS NULL OR o.topic = ANY(CAST(:topics AS text[]))
               OR (o.topic = :dlt_topic AND h.original_topic = ANY(CAST(:topics AS text[]))))
    )
"""

_LIST = text(
    _STUCK
    + """
    SELECT id, shard, state, topic, original_topic, partition, attempts,
           CAST(dlt_attempts AS integer) AS dlt_attempts, error_class, key, value_bytes,
           created_at, parked_at
    FROM stuck
    WHERE state = ANY(CAST(:states AS text[])) AND id > :after
    ORDER BY id
    LIMIT :limit
    """
).bindparams(
    bindparam("ids", type_=ARRAY(BIGINT)),
    bindparam("topics", type_=ARRAY(TEXT)),
    bindparam("states", type_=ARRAY(TEXT)),
)

_WAKE_RELAYS = text("SELECT pg_notify(:channel, '')")

_RETRY = text(
    _STUCK
    + """
    , chosen AS (
        -- a dead letter whose original topic its headers name goes back there, as it was:
        -- its own headers, its value (from dlt_values if it was kept there), its partition
        SELECT s.id, s.original_topic IS NOT NULL AND s.topic = :dlt_topic AS back,
               s.original_topic, s.original_partition, s.value_ref
        FROM stuck s
        WHERE s.state = ANY(CAST(:states AS text[]))
    )
    UPDATE outbox o
    SET parked_at = NULL, attempts = 0,
        topic = CASE WHEN c.back THEN c.original_topic ELSE o.topic END,
        partition = CASE WHEN c.back AND c.original_partition ~ '^[0-9]{1,9}$'
                         THEN CAST(c.original_partition AS integer)
                         WHEN c.back THEN NULL ELSE o.partition END,
        headers = CASE WHEN c.back THEN (
                      SELECT coalesce(jsonb_agg(e.h ORDER BY e.n), '[]'::jsonb)
                      FROM jsonb_array_elements(o.headers) WITH ORDINALITY AS e(h, n)
                      WHERE jsonb_array_length(e.h) > 2 OR left(e.h ->> 0, 7) <> 'qm.dlt.')
                  ELSE o.headers END,
        payload = CASE WHEN c.back AND c.value_ref IS NOT NULL AND o.payload IS NULL
                       THEN (SELECT v.value FROM dlt_values v
                             WHERE v.id::text = c.value_ref)
                       ELSE o.payload END
    FROM chosen c
    -- the same predicate again: a row the relay published or parked meanwhile is left alone
    WHERE o.id = c.id AND (o.parked_at IS NOT NULL OR o.attempts > 0 OR o.topic = :dlt_topic)
    RETURNING o.id, o.topic
    """
).bindparams(
    bindparam("ids", type_=ARRAY(BIGINT)),
    bindparam("topics", type_=ARRAY(TEXT)),
    bindparam("states", type_=ARRAY(TEXT)),
)


async def stuck_rows(
    conn: AsyncConnection,
    dlt_topic: str,
    *,
    states: Sequence[str] = STATES,
    topics: Sequence[str] | None = None,
    after: int = 0,
    limit: int = 200,
) -> list[Row]:
    """Rows parked, refused or dead-lettered (``states``), of ``topics`` (where they go now or,
    for a dead letter, where they were going), in id order after ``after``."""
    result = await conn.execute(
        _LIST,
        {
            "dlt_topic": dlt_topic,
            "ids": None,
            "topics": None if topics is None else list(topics),
            "states": list(states),
            "after": after,
            "limit": limit,
        },
    )
    return list(result.mappings())


async def retry_rows(
    conn: AsyncConnection,
    dlt_topic: str,
    *,
    ids: Sequence[int] | None = None,
    states: Sequence[str] = STATES,
    topics: Sequence[str] | None = None,
) -> list[Row]:
    """Send the chosen stuck rows again: no longer parked, no try spent, a dead letter back on
    its original topic; wakes the relays. Returns each row's id and the topic it goes to now."""
    result = await conn.execute(
        _RETRY,
        {
            "dlt_topic": dlt_topic,
            "ids": None if ids is None else list(ids),
            "topics": None if topics is None else list(topics),
            "states": list(states),
        },
    )
    retried: list[Row] = list(result.mappings())
    if retried:  # relays waiting for work read them now, not at their next poll
        await conn.execute(_WAKE_RELAYS, {"channel": NOTIFY_CHANNEL})
    return retried
