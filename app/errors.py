"""How every consumer of Quartermaster sorts a failure: one classification, used everywhere.

- ``INVALID``: the input itself is bad (not JSON, nested too deep, unknown type/v, schema
  violation, too large).
  Dead-lettered at once; a ``request.invalid`` reply where a reply topic can be read.
- ``TRANSIENT``: infrastructure (database down, serialization failure, deadlock, broker timeout,
  a statement prepared before a migration changed its table).
  Retried in place with capped backoff; never dead-lettered, never skipped.
- ``UNEXPECTED``: anything else. Retried a few times with capped backoff (``unexpected_delay``),
  then dead-lettered with its class and message so one bad record cannot stall a partition.

``describe`` says what failed without echoing input: a validation error keeps each field's path
and redacts only the message; a database error names its class, SQLSTATE and the table,
column or constraint involved, never the SQL text or its parameters.
"""

from __future__ import annotations

import json
from enum import StrEnum

from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError
from asyncpg.exceptions import InvalidCachedStatementError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.redaction import redact
from schemas.nesting import NestingTooDeep


class Disposition(StrEnum):
    INVALID = "invalid"
    TRANSIENT = "transient"
    UNEXPECTED = "unexpected"


class InvalidMessage(Exception):
    """Input that can never be processed, whatever is retried (e.g. too large, not JSON)."""


# SQLSTATE classes and codes that clear up by themselves: connection exceptions, serialization
# failures and deadlocks, too many connections, shutdown, lock timeouts, read-only standby.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P", "55P03", "25006")


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None), exc):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def classify(exc: BaseException) -> Disposition:
    """Sort one failure into what to do about it."""
    if isinstance(
        exc,
        InvalidMessage
        | ValidationError
        | json.JSONDecodeError
        | UnicodeDecodeError
        | NestingTooDeep,
    ):
        return Disposition.INVALID
    if isinstance(
        exc,
        DisconnectionError
        | PoolTimeout
        | KafkaConnectionError
        | KafkaTimeoutError
        | NodeNotReadyError
        | ConnectionError
        | TimeoutError,
    ):
        return Disposition.TRANSIENT
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or _cached_plan_outdated(exc):
            return Disposition.TRANSIENT
        code = _sqlstate(exc)
        if code and code.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
            return Disposition.TRANSIENT
        if isinstance(exc.orig, OSError | ConnectionError):
            return Disposition.TRANSIENT
        return Disposition.UNEXPECTED
    if isinstance(exc, OSError):
        return Disposition.TRANSIENT
    return Disposition.UNEXPECTED


def _cached_plan_outdated(exc: DBAPIError) -> bool:
    """A statement prepared before a migration changed its table (a rolling upgrade): the driver
    drops its statement cache, so the next try prepares it again and succeeds."""
    orig = exc.orig
    return any(
        isinstance(candidate, InvalidCachedStatementError)
        for candidate in (orig, getattr(orig, "__cause__", None))
    )


def unexpected_delay(attempt: int, cap: float, first: float = 0.1) -> float:
    """Seconds to wait after the ``attempt``-th unexpected failure: doubling from ``first``,
    at most ``cap``."""
    return min(cap, first * 2 ** min(max(attempt - 1, 0), 32))


def error_class(exc: BaseException) -> str:
    """The failure's class name, as a reply may carry it: no message, nothing of the input."""
    return redact(type(exc).__name__, limit=200)


def describe(exc: BaseException) -> str:
    """A short description of a failure that never echoes the input (which may hold secrets)."""
    if isinstance(exc, ValidationError):
        parts = [
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {redact(err['msg'])}"
            for err in exc.errors(include_input=False, include_url=False)[:10]
        ]
        return "; ".join(parts)
    if isinstance(exc, DBAPIError):
        return describe_database_error(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at position {exc.pos}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return redact(str(exc))


def describe_database_error(exc: DBAPIError) -> str:
    """The driver's error class, SQLSTATE and the schema objects it names; no SQL, no values."""
    orig = exc.orig
    cause = getattr(orig, "__cause__", None) or orig  # asyncpg's own error under the adapter's
    parts = [f"database error {type(cause).__name__}"]
    code = _sqlstate(exc)
    if code:
        parts.append(f"SQLSTATE {code}")
    for attribute in ("table_name", "column_name", "constraint_name"):
        named = getattr(cause, attribute, None)
        if isinstance(named, str) and named:
            parts.append(f"{attribute.removesuffix('_name')} {named}")
    return ", ".join(parts)
