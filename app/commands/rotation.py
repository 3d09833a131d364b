"""Secrets at rest under the newest key: every sealed column re-encrypted in batches, and the
values no configured key opens found (`qm keys rotate|check`, docs/security.md).

A pass reads a column in primary-key order, a batch at a time (keyset pagination), and writes
each value that an older key opens re-encrypted with the newest (``SecretBox.rotate``) by
compare-and-set: a value changed meanwhile (a session merged, a secret set again) is never
overwritten; it is read again and, if it still needs it, rotated on the next pass. A value
already under the newest key is left alone, so a run that was interrupted is finished by
running it again, and a run after a finished one writes nothing. A value no configured key
opens is reported and skipped: rotation never fails for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.crypto import SecretBox
from app.store import Database
from app.store.sealed_columns import (
    SealedColumn,
    SealedValue,
    count_sealed,
    replace_sealed,
    sealed_after,
    sealed_of,
)

BATCH_SIZE = 500
# how many times values changed meanwhile are read again before the run leaves them for the next
MAX_PASSES = 5

# called before each write (tests change the row meanwhile here)
BeforeWrite = Callable[[SealedColumn, SealedValue], Awaitable[None]]


class Progress(Protocol):
    """What a pass reports as it goes (a progress bar)."""

    def start(self, column: str, total: int) -> None: ...

    def advance(self, rows: int) -> None: ...


class NoProgress:
    def start(self, column: str, total: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass


@dataclass(slots=True)
class ColumnReport:
    """What a pass over one column found and did."""

    column: str
    rows: int = 0  # values read
    rotated: int = 0  # re-encrypted with the newest key
    current: int = 0  # already under the newest key
    changed: int = 0  # changed meanwhile: read again
    left: int = 0  # still changing after MAX_PASSES: the next run does them
    by_key: Counter[int] = field(default_factory=Counter)  # values by the key that opens them
    unopened: list[SealedValue] = field(default_factory=list)  # no configured key opens


def _batches(
    db: Database, column: SealedColumn, batch_size: int
) -> Callable[[], Awaitable[list[SealedValue]]]:
    """The next batch of the column at each call, in key order; empty at the end."""
    after: int | str = column.first

    async def next_batch() -> list[SealedValue]:
        nonlocal after
        async with db.transaction() as conn:
            batch = await sealed_after(conn, column, after, batch_size)
        if batch:
            after = batch[-1].id
        return batch

    return next_batch


async def _count(db: Database, column: SealedColumn) -> int:
    async with db.transaction() as conn:
        return await count_sealed(conn, column)


def _sort(box: SecretBox, values: Sequence[SealedValue], report: ColumnReport) -> list[SealedValue]:
    """Count each value by the key that opens it; return those an older key opens."""
    older: list[SealedValue] = []
    for value in values:
        key = box.key_of(value.sealed)
        if key is None:
            report.unopened.append(value)
            continue
        report.by_key[key] += 1
        if key == 0:
            report.current += 1
        else:
            older.append(value)
    return older


async def _write(
    db: Database,
    box: SecretBox,
    column: SealedColumn,
    values: Sequence[SealedValue],
    report: ColumnReport,
    before_write: BeforeWrite | None,
) -> list[int | str]:
    """Rotate ``values`` by compare-and-set, one transaction; return the ids that changed
    meanwhile."""
    lost: list[int | str] = []
    if not values:
        return lost
    rotated = [(value, box.rotate(value.sealed)) for value in values]
    async with db.transaction() as conn:
        for value, new in rotated:
            if before_write is not None:
                await before_write(column, value)
            if await replace_sealed(conn, column, value.id, value.sealed, new):
                report.rotated += 1
            else:
                lost.append(value.id)
    return lost


async def rotate_column(
    db: Database,
    box: SecretBox,
    column: SealedColumn,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    before_write: BeforeWrite | None = None,
) -> ColumnReport:
    """Re-encrypt every value of ``column`` that an older key opens with the newest key."""
    progress = progress or NoProgress()
    report = ColumnReport(column.name)
    progress.start(column.name, await _count(db, column))
    next_batch = _batches(db, column, batch_size)
    lost: list[int | str] = []
    while batch := await next_batch():
        report.rows += len(batch)
        lost += await _write(db, box, column, _sort(box, batch, report), report, before_write)
        progress.advance(len(batch))
    for _ in range(MAX_PASSES):
        if not lost:
            break
        report.changed += len(lost)
        async with db.transaction() as conn:
            again = await sealed_of(conn, column, lost)
        lost = await _write(db, box, column, _sort(box, again, report), report, before_write)
    report.left = len(lost)
    return report


async def check_column(
    db: Database,
    box: SecretBox,
    column: SealedColumn,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> ColumnReport:
    """Count every value of ``column`` by the key that opens it; list those none opens."""
    progress = progress or NoProgress()
    report = ColumnReport(column.name)
    progress.start(column.name, await _count(db, column))
    next_batch = _batches(db, column, batch_size)
    while batch := await next_batch():
        report.rows += len(batch)
        older = _sort(box, batch, report)
        report.left += len(older)  # under an older key: `qm keys rotate` re-encrypts them
        progress.advance(len(batch))
    return report
