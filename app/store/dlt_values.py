"""Values too large to travel in their dead letter (table ``dlt_values``).

The dead letter carries the row's id (``qm.dlt.value_ref``) and the value's SHA-256; ``qm dlt show``
and ``qm dlt replay`` read the value back from here. Rows are written in the same transaction as
the dead letter's outbox row, so a dead letter never points at a value that is not there.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A value kept by reference: its row id, digest and bytes."""

    ref: str
    sha256: str
    value: bytes

    @classmethod
    def of(cls, value: bytes) -> StoredValue:
        return cls(str(uuid.uuid4()), hashlib.sha256(value).hexdigest(), value)


_INSERT = text(
    "INSERT INTO dlt_values (id, sha256, value) VALUES (CAST(:id AS uuid), :sha256, :value)"
)

_FETCH = text(
    "SELECT id::text AS id, sha256, value FROM dlt_values WHERE id = ANY(:ids)"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=False))))


async def store_value(conn: AsyncConnection, stored: StoredValue) -> None:
    """Keep ``stored`` inside the caller's transaction."""
    await conn.execute(_INSERT, {"id": stored.ref, "sha256": stored.sha256, "value": stored.value})


async def fetch_values(conn: AsyncConnection, refs: Sequence[str]) -> dict[str, StoredValue]:
    """The stored values of ``refs`` that exist, by ref (a ref that is not a UUID finds nothing)."""
    wanted = [ref for ref in refs if _is_uuid(ref)]
    if not wanted:
        return {}
    result = await conn.execute(_FETCH, {"ids": wanted})
    return {row.id: StoredValue(row.id, row.sha256, bytes(row.value)) for row in result}


def _is_uuid(text_: str) -> bool:
    try:
        uuid.UUID(text_)
    except ValueError:
        return False
    return True
