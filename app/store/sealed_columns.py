"""The columns sealed at rest with ``QM_SECRET_KEYS``, read in primary-key order and rewritten
one row at a time by compare-and-set (`qm keys rotate|check`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A sealed column, its table's primary key, and how a row names its site and account."""

    table: str
    column: str
    key: str  # the primary key: the order of the batches, the row each write names
    first: int | str  # below every key: where a pass starts
    # the FROM clause and the site and username an operator knows the row by
    source: str
    site: str
    username: str

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


# Every column SecretBox seals. Statements are built from these constants only, never from input.
SEALED_COLUMNS = (
    SealedColumn("accounts", "secret", "id", 0, "accounts t", "t.site", "t.username"),
    SealedColumn(
        "sessions",
        "storage_state",
        "account_id",
        0,
        "sessions t JOIN accounts a ON a.id = t.account_id",
        "a.site",
        "a.username",
    ),
    SealedColumn("sites", "webhook_sealed", "slug", "", "sites t", "t.slug", "NULL"),
    # a proxy's URL with its credentials; the row is known by its site and label
    SealedColumn("proxies", "url_sealed", "id", 0, "proxies t", "t.site", "t.label"),
)


@dataclass(frozen=True, slots=True)
class SealedValue:
    """One row's sealed value, by its primary key (an account id, a site slug)."""

    id: int | str
    sealed: bytes
    site: str | None
    username: str | None


def _select(column: SealedColumn, where: str) -> TextClause:
    return text(
        f"""
        SELECT t.{column.key} AS id, t.{column.column} AS sealed,
               {column.site} AS site, {column.username} AS username
        FROM {column.source}
        WHERE t.{column.column} IS NOT NULL AND {where}
        ORDER BY t.{column.key}
        LIMIT :limit
        """
    )


def _values(rows: Sequence[Row]) -> list[SealedValue]:
    return [
        SealedValue(row["id"], bytes(row["sealed"]), row["site"], row["username"]) for row in rows
    ]


async def count_sealed(conn: AsyncConnection, column: SealedColumn) -> int:
    """How many rows hold a value in ``column``."""
    statement = text(f"SELECT count(*) FROM {column.table} WHERE {column.column} IS NOT NULL")
    return int((await conn.execute(statement)).scalar_one())


async def sealed_after(
    conn: AsyncConnection, column: SealedColumn, after: int | str, limit: int
) -> list[SealedValue]:
    """The next ``limit`` sealed values of ``column`` whose key is above ``after``, in key order
    (keyset pagination: each batch is one index range, however large the table)."""
    statement = _select(column, f"t.{column.key} > :after")
    result = await conn.execute(statement, {"after": after, "limit": limit})
    return _values(result.mappings().all())


async def sealed_of(
    conn: AsyncConnection, column: SealedColumn, ids: Sequence[int | str]
) -> list[SealedValue]:
    """The sealed values of ``column`` in the rows ``ids`` (read again after a lost write)."""
    cast = "text[]" if isinstance(column.first, str) else "bigint[]"
    statement = _select(column, f"t.{column.key} = ANY(CAST(:ids AS {cast}))")
    result = await conn.execute(statement, {"ids": list(ids), "limit": len(ids)})
    return _values(result.mappings().all())


async def replace_sealed(
    conn: AsyncConnection, column: SealedColumn, id_: int | str, old: bytes, new: bytes
) -> bool:
    """Write ``new`` over ``old`` only if the row still holds ``old`` (compare-and-set): a value
    changed meanwhile (a session merged, a secret set) is never overwritten. Nothing else of
    the row changes (a session keeps its version: its content is the same)."""
    statement = text(
        f"""
        UPDATE {column.table} SET {column.column} = :new
        WHERE {column.key} = :id AND {column.column} = :old
        RETURNING {column.key}
        """
    )
    result = await conn.execute(statement, {"id": id_, "old": old, "new": new})
    return result.first() is not None
