"""The replay ledger (table ``dlt_replays``): which dead letters ``qm dlt replay`` already sent.

A row means "this dead letter's copy was acknowledged by the broker on ``target_topic``". A copy
that fails again comes back as a new dead letter whose ``qm.replayed_from`` names its parent; the
parent's row here is how a replay knows that lineage was replayed already. Rows are
written only after the ack, so the ledger never claims a replay that did not happen; the window
between the ack and the insert is the at-least-once window described in docs/dead-letters.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, INTEGER, TEXT
from sqlalchemy.ext.asyncio import AsyncConnection

from app.dlt.letter_headers import OffsetRange

# classid of the session advisory lock one replay run holds per dead-letter topic; the outbox
# uses 0x514D and 0x514E
REPLAY_LOCK_CLASS = 0x514F


@dataclass(frozen=True, slots=True)
class ReplayedOffset:
    """One dead letter that was replayed: where it sits and where its copy went."""

    partition: int
    offset: int
    target_topic: str


_TRY_LOCK = text("SELECT pg_try_advisory_lock(:lock_class, hashtext(:topic))")
_UNLOCK = text("SELECT pg_advisory_unlock(:lock_class, hashtext(:topic))")

_REPLAYED_IN = text(
    """
    SELECT r."partition", r."offset"
    FROM dlt_replays AS r
    JOIN unnest(:partitions, :starts, :ends) AS w(p, lo, hi)
      ON r."partition" = w.p AND r."offset" >= w.lo AND r."offset" < w.hi
    WHERE r.topic = :topic
    """
).bindparams(
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("starts", type_=ARRAY(BIGINT)),
    bindparam("ends", type_=ARRAY(BIGINT)),
)

_VALUES = """
    SELECT CAST(:topic AS text), v.p, v.o, v.t
    FROM unnest(:partitions, :offsets, :targets) AS v(p, o, t)
"""

# A first replay: an offset someone else already recorded is left alone and not returned.
_RECORD = text(
    f"""
    INSERT INTO dlt_replays (topic, "partition", "offset", target_topic)
    {_VALUES}
    ON CONFLICT (topic, "partition", "offset") DO NOTHING
    RETURNING "partition", "offset"
    """
).bindparams(
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("offsets", type_=ARRAY(BIGINT)),
    bindparam("targets", type_=ARRAY(TEXT)),
)

# `--again`: the row already exists and now says when and where the latest copy went.
_RECORD_AGAIN = text(
    f"""
    INSERT INTO dlt_replays (topic, "partition", "offset", target_topic)
    {_VALUES}
    ON CONFLICT (topic, "partition", "offset")
    DO UPDATE SET target_topic = EXCLUDED.target_topic, replayed_at = now()
    RETURNING "partition", "offset"
    """
).bindparams(
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("offsets", type_=ARRAY(BIGINT)),
    bindparam("targets", type_=ARRAY(TEXT)),
)


async def try_lock_topic(conn: AsyncConnection, topic: str) -> bool:
    """Take the session lock of ``topic``'s replays; False when another run holds it."""
    result = await conn.execute(_TRY_LOCK, {"lock_class": REPLAY_LOCK_CLASS, "topic": topic})
    return bool(result.scalar())


async def unlock_topic(conn: AsyncConnection, topic: str) -> None:
    """Give back the session lock taken by ``try_lock_topic``."""
    await conn.execute(_UNLOCK, {"lock_class": REPLAY_LOCK_CLASS, "topic": topic})


async def list_replayed(
    conn: AsyncConnection, topic: str, ranges: Sequence[OffsetRange]
) -> set[tuple[int, int]]:
    """The (partition, offset) pairs of ``topic`` inside ``ranges`` that were already replayed."""
    ranges = [r for r in ranges if r.size]
    if not ranges:
        return set()
    result = await conn.execute(
        _REPLAYED_IN,
        {
            "topic": topic,
            "partitions": [r.partition for r in ranges],
            "starts": [r.start for r in ranges],
            "ends": [r.end for r in ranges],
        },
    )
    return {(int(p), int(o)) for p, o in result.all()}


_REPLAYED_AT = text(
    """
    SELECT r.topic, r."partition", r."offset"
    FROM dlt_replays AS r
    JOIN unnest(:topics, :partitions, :offsets) AS w(t, p, o)
      ON r.topic = w.t AND r."partition" = w.p AND r."offset" = w.o
    """
).bindparams(
    bindparam("topics", type_=ARRAY(TEXT)),
    bindparam("partitions", type_=ARRAY(INTEGER)),
    bindparam("offsets", type_=ARRAY(BIGINT)),
)


async def list_replayed_at(
    conn: AsyncConnection, coordinates: Sequence[tuple[str, int, int]]
) -> set[tuple[str, int, int]]:
    """Which of the (topic, partition, offset) dead letters were already replayed."""
    if not coordinates:
        return set()
    result = await conn.execute(
        _REPLAYED_AT,
        {
            "topics": [c[0] for c in coordinates],
            "partitions": [c[1] for c in coordinates],
            "offsets": [c[2] for c in coordinates],
        },
    )
    return {(str(t), int(p), int(o)) for t, p, o in result.all()}


async def record_replays(
    conn: AsyncConnection, topic: str, rows: Sequence[ReplayedOffset], *, again: bool = False
) -> set[tuple[int, int]]:
    """Record acknowledged replays of ``topic``; return the (partition, offset) pairs written.

    Without ``again`` an offset already in the ledger is left as it was and not returned: the
    caller learns that another run got there first. With ``again`` the row is refreshed.
    """
    if not rows:
        return set()
    result = await conn.execute(
        _RECORD_AGAIN if again else _RECORD,
        {
            "topic": topic,
            "partitions": [r.partition for r in rows],
            "offsets": [r.offset for r in rows],
            "targets": [r.target_topic for r in rows],
        },
    )
    return {(int(p), int(o)) for p, o in result.all()}
