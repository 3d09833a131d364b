"""What the audit reads of an event: one ``Fact`` of the lease history, or nothing, or
``Unreadable`` with its reason (docs/audit.md names the fields each kind needs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any, NamedTuple

# a decoder built once: ``json.loads`` would build the same one and sniff the encoding per event
_decode = json.JSONDecoder().decode


class Position(NamedTuple):
    """Where an event was read: a topic's partition and offset (a file: its name, 0, its line)."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Kind(IntEnum):
    """A fact's kind; at one instant, ends and returns are applied before grants and takes."""

    END = 0
    SEED_RETURN = 1
    HANDOFF = 2
    EXTEND = 3
    GRANT = 4
    SEED_TAKE = 5


KINDS: dict[str, Kind] = {
    "job.granted": Kind.GRANT,
    "job.extended": Kind.EXTEND,
    "job.finished": Kind.END,
    "job.cancelled": Kind.END,
    "job.expired": Kind.END,
    "job.revoked": Kind.END,
    "job.rejected": Kind.END,
    "seed.assigned": Kind.SEED_TAKE,
    "seed.released": Kind.SEED_RETURN,
    "seed.done": Kind.SEED_RETURN,
    "seed.failed": Kind.SEED_RETURN,
    "seed.disabled": Kind.SEED_RETURN,
    "capture.handed_off": Kind.HANDOFF,
}
# a waiting job's cancel or rejection carries no lease: not part of the lease history
# ends that carry no lease token when they end no lease: a waiting job cancelled, a start refused,
# a seed disabled by an operator while nobody held it
ENDS_WITHOUT_LEASE = frozenset({"job.cancelled", "job.rejected", "seed.disabled"})


@dataclass(slots=True)
class Fact:
    """One transition of the history. ``token`` is the lease token (the handoff token for a
    hand-off); ``subject`` the job, seed or capture id; times are epoch seconds of the
    database's clock."""

    kind: Kind
    type: str
    at: float
    token: int
    subject: str
    site: str
    position: Position
    account: str | None = None
    expires: float | None = None
    capacity: int | None = None


class Unreadable(Exception):
    """An event the audit cannot read; its message says why (never the event's content)."""


def _time(value: Any, name: str) -> float:
    if not isinstance(value, str):
        raise Unreadable(f"{name} missing or not a time")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise Unreadable(f"{name} is not an ISO 8601 time") from None


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise Unreadable(f"{name} missing or not an integer")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise Unreadable(f"{name} missing or not a string")
    return value


def read_fact(value: bytes | str | None, position: Position) -> Fact | None:
    """The fact an event's value states; None when it is no part of the lease history."""
    if value is None:
        raise Unreadable("no value")
    try:
        doc = _decode(value.decode() if isinstance(value, bytes) else value)
    except (ValueError, UnicodeDecodeError):
        raise Unreadable("not JSON") from None
    except RecursionError:
        raise Unreadable("JSON nested too deep") from None
    if not isinstance(doc, dict):
        raise Unreadable("not a JSON object")
    return fact_of(doc, position)


def fact_of(doc: dict[str, Any], position: Position) -> Fact | None:
    """The fact of an event already parsed (see ``read_fact``)."""
    what = doc.get("type")
    if not isinstance(what, str):
        raise Unreadable("type missing or not a string")
    kind = KINDS.get(what)
    if kind is None:
        return None
    if what in ENDS_WITHOUT_LEASE and doc.get("lease_token") is None:
        return None
    if "db_at" not in doc:
        raise Unreadable(f"{what} without db_at (written before events carried the history)")
    at = _time(doc["db_at"], "db_at")
    subject, site = _str(doc.get("id"), "id"), _str(doc.get("site"), "site")
    if kind is Kind.HANDOFF:
        return Fact(kind, what, at, _int(doc.get("handoff_token"), "handoff_token"), subject,
                    site, position)  # fmt: skip
    token = _int(doc.get("lease_token"), "lease_token")
    if kind in (Kind.SEED_TAKE, Kind.SEED_RETURN, Kind.END):
        account = doc.get("account_id")
        return Fact(kind, what, at, token, subject, site, position,
                    account=None if account is None else _str(account, "account_id"))  # fmt: skip
    account = doc.get("account_id")
    capacity = doc.get("capacity")
    return Fact(
        kind,
        what,
        at,
        token,
        subject,
        site,
        position,
        account=None if account is None else _str(account, "account_id"),
        expires=_time(doc.get("lease_expires_at"), "lease_expires_at"),
        capacity=None if capacity is None else _int(capacity, "capacity"),
    )
