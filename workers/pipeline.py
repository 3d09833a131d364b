"""The bookkeeping of pipelined consumption, without I/O: which offsets may be committed, and
which waiting records may go into the next transaction.

``Positions``: the records of one partition handed over and not yet final, in the order they were
read. Records finish in any order; the partition is committed only up to the first one that has
not, so a crash or a move of the partition reads again every record whose outcome was not final.

``KeyedQueue``: records waiting for a transaction, in the order they were read. A taker takes
them in that order, passing over a record whose key (its job) is busy in a running transaction
and every later record of a key passed over, so two records of one job are never in two running
transactions and a later one never commits before an earlier one.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Positions:
    """Offsets of one partition's records handed over, committed in order as they finish."""

    def __init__(self) -> None:
        self._taken: deque[int] = deque()
        self._finished: set[int] = set()
        self._next: int | None = None  # the offset after the last record finished in order
        self._committed: int | None = None

    def __len__(self) -> int:
        return len(self._taken)

    def take(self, offset: int) -> None:
        """A record was handed over (offsets are taken in increasing order)."""
        assert not self._taken or offset > self._taken[-1], "offsets are taken in order"
        self._taken.append(offset)

    def forget(self, offset: int) -> None:
        """The last record taken was not handed over after all: it will be read again."""
        assert self._taken and self._taken[-1] == offset, "only the last record is forgotten"
        self._taken.pop()

    def finish(self, offset: int) -> None:
        """A record's outcome is final; the partition moves past it once those before it are."""
        if offset not in self._taken or offset in self._finished:
            return
        self._finished.add(offset)
        while self._taken and self._taken[0] in self._finished:
            done = self._taken.popleft()
            self._finished.discard(done)
            self._next = done + 1

    def to_commit(self) -> int | None:
        """The offset to commit now (the next record to read), or None when nothing moved."""
        if self._next is None or self._next == self._committed:
            return None
        return self._next

    def committed(self, offset: int) -> None:
        self._committed = offset


@dataclass(eq=False)
class Waiting(Generic[T]):
    """A waiting record's item, its key (None: no order to keep) and whether it goes alone."""

    item: T
    key: Hashable | None
    alone: bool = False


class KeyedQueue(Generic[T]):
    """Records waiting for a transaction, taken in order with a key held by one taker at a time."""

    def __init__(self) -> None:
        self._waiting: list[Waiting[T]] = []
        self._busy: Counter[Hashable] = Counter()

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, item: T, key: Hashable | None, *, alone: bool = False) -> None:
        self._waiting.append(Waiting(item, key, alone))

    def take(self, most: int) -> list[Waiting[T]]:
        """Up to ``most`` waiting records, in order, whose keys are free; their keys become busy.

        A record marked ``alone`` is taken only by itself, as the first of a take. A record
        passed over holds back the later records of its key.
        """
        taken: list[Waiting[T]] = []
        kept: list[Waiting[T]] = []
        held: set[Hashable] = set()
        for entry in self._waiting:
            key = entry.key
            free = key is None or (key not in self._busy and key not in held)
            fits = len(taken) < most and not (entry.alone and taken) and not _ends(taken)
            if free and fits:
                taken.append(entry)
            else:
                kept.append(entry)
                if key is not None:
                    held.add(key)
        self._waiting = kept
        self._busy.update(entry.key for entry in taken if entry.key is not None)
        return taken

    def release(self, entry: Waiting[T]) -> None:
        """The entry's transaction (or its run alone) ended: its key is free again."""
        if entry.key is not None:
            self._busy[entry.key] -= 1
            if self._busy[entry.key] <= 0:
                del self._busy[entry.key]

    def put_back(self, entries: Iterable[Waiting[T]]) -> None:
        """Return taken entries to the front, in their order, each to go alone; release them.

        Their keys are freed in the same step, so no later record of theirs can be taken
        in between: those wait behind them.
        """
        back = [Waiting(entry.item, entry.key, alone=True) for entry in entries]
        for entry in back:
            self.release(entry)
        self._waiting[:0] = back

    def drop(self) -> list[Waiting[T]]:
        """Remove every waiting record (the worker stops); the removed."""
        dropped, self._waiting = self._waiting, []
        return dropped

    def busy(self, key: Hashable) -> bool:
        return key in self._busy


def _ends(taken: list[Waiting[T]]) -> bool:
    """A take that starts with a record going alone ends with it."""
    return bool(taken) and taken[0].alone
