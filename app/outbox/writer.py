"""The outbox writer: messages join the caller's transaction and leave only if it commits."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.outbox import OutboxRow, insert_rows

MESSAGE_ID = "message_id"


def shard_of(key: bytes | None, shards: int) -> int:
    """The shard of a key: a stable hash, so one key always lands in one shard."""
    if key is None:
        return 0
    return zlib.crc32(key) % shards


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def encode(payload: Mapping[str, Any] | bytes) -> bytes:
    """JSON bytes of a payload (bytes pass through untouched)."""
    if isinstance(payload, bytes):
        return payload
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


class Outbox:
    """Collects the messages of one transaction; ``flush`` writes them all in one insert.

    Each message gets a ``message_id`` header (a UUID) by which consumers deduplicate the rare
    republish after a relay crash.
    """

    def __init__(self, shards: int = 16) -> None:
        self.shards = shards
        self.rows: list[OutboxRow] = []

    def add(
        self,
        topic: str,
        key: str | bytes | None,
        payload: Mapping[str, Any] | bytes,
        headers: Iterable[tuple[str, str | bytes]] = (),
    ) -> str:
        """Queue one message; returns its message id."""
        message_id = str(uuid.uuid4())
        raw_key = None if key is None else as_bytes(key)
        self.rows.append(
            OutboxRow(
                topic=topic,
                key=raw_key,
                payload=encode(payload),
                headers=(
                    (MESSAGE_ID, message_id.encode()),
                    *((name, as_bytes(value)) for name, value in headers),
                ),
                shard=shard_of(raw_key, self.shards),
            )
        )
        return message_id

    async def flush(self, conn: AsyncConnection) -> int:
        """Insert the queued messages inside ``conn``'s transaction; returns how many."""
        count = len(self.rows)
        await insert_rows(conn, self.rows)
        self.rows = []
        return count


async def enqueue(
    conn: AsyncConnection,
    topic: str,
    key: str | bytes | None,
    payload: Mapping[str, Any] | bytes,
    headers: Iterable[tuple[str, str | bytes]] = (),
    *,
    shards: int = 16,
) -> str:
    """Write one message inside the caller's transaction; returns its message id."""
    box = Outbox(shards)
    message_id = box.add(topic, key, payload, headers)
    await box.flush(conn)
    return message_id
