"""Reading a fetched record whose header name is not UTF-8, instead of failing on it.

Kafka's header names are strings, but a producer other than ours (librdkafka, Go) can write any
bytes there. aiokafka decodes every name as UTF-8 while it reads a fetched batch, so one such
record raises ``UnicodeDecodeError`` out of the consumer's read, before any handler sees it, and
the consumer reads the same offset again: for ever. ``install`` makes the consumers of this
process read such a batch again, from its bytes, with aiokafka's own pure-Python record reader,
keeping an undecodable name as a string that carries its bytes (``surrogateescape``). The record
then reaches its handler like any other, which refuses it (``undecodable_header_names``) and
dead-letters it; the records after it are read as usual. Batches that decode (all but these)
keep aiokafka's compiled reader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, SupportsIndex, overload

import structlog
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import _MemoryRecordsPy

from app.kafka_headers import printable_header_name

log = structlog.get_logger()


def install() -> None:
    """Make this process's consumers read batches with ``LenientRecords`` (idempotent)."""
    fetcher.MemoryRecords = LenientRecords


def undecodable_header_names(headers: Iterable[tuple[str, Any]]) -> list[str]:
    """The header names that were not UTF-8 on the wire, escaped (``\\xff``) for a message."""
    return [
        printable_header_name(name) for name, _ in headers if printable_header_name(name) != name
    ]


class LenientRecords:
    """The record batches of one fetched partition, as aiokafka's ``MemoryRecords`` gives them,
    each able to read its records again leniently when a header name does not decode."""

    def __init__(self, data: bytes) -> None:
        self._records = _MemoryRecordsPy(data)

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        raw = self._records._next_slice  # the bytes of the batch next_batch is about to return
        batch = self._records.next_batch()
        if batch is None or raw is None or batch.magic < 2:
            return batch  # only v2 batches carry headers
        return _LenientBatch(batch, raw)


class _LenientBatch:
    """A v2 batch read by aiokafka's compiled reader until a header name does not decode; from
    there on by its pure-Python reader, which keeps such a name's bytes."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._last: int | None = None  # the offset of the last record read
        self._lenient: _LenientBatchPy | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        iter(self._batch)  # a compressed batch decompresses here
        return self

    def __next__(self) -> Any:
        if self._lenient is None:
            try:
                record = next(self._batch)
            except UnicodeDecodeError:
                log.warning(
                    "header_name_not_utf8",
                    base_offset=self._batch.base_offset,
                    after_offset=self._last,
                )
                self._lenient = _LenientBatchPy(bytes(self._raw))
                iter(self._lenient)
            else:
                self._last = record.offset
                return record
        while True:  # the records before the one that failed were read already
            record = next(self._lenient)
            if self._last is None or record.offset > self._last:
                return record


class _LenientBatchPy(_DefaultRecordBatchPy):
    """aiokafka's pure-Python v2 batch reader, reading header names with ``surrogateescape``."""

    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        buffer: bytearray = self._buffer  # type: ignore[has-type]
        if not isinstance(buffer, _LenientBuffer):
            self._buffer = _LenientBuffer(buffer)


class _LenientBytes(bytearray):
    """A slice of a record whose ``decode`` (the reader decodes only header names) keeps the
    bytes that are not UTF-8."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return super().decode(encoding, "surrogateescape")


class _LenientBuffer(bytearray):
    """A batch's bytes whose slices are ``_LenientBytes``."""

    @overload
    def __getitem__(self, index: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> bytearray: ...
    def __getitem__(self, index: SupportsIndex | slice) -> int | bytearray:
        item = super().__getitem__(index)
        return _LenientBytes(item) if isinstance(index, slice) else item
