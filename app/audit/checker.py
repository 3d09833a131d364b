"""The exclusivity checker: the lease history's facts in, violations out, streaming.

Facts are applied in the order of the database's clock (``db_at``): events of one account's
leases travel under different keys, so partitions deliver them in any order; a reorder buffer
holds ``reorder_seconds`` of history and releases the oldest first. What it keeps between facts
is bounded by what is live (leases, held seeds), by accounts and sites (each account's first
token and last end, which catch a second end of its leases however late), and by the facts of
the last ``horizon_seconds`` (ended leases and handed-off captures, kept to tell a relay's
duplicate from a second end or hand-off, with both events): never by the history's length
(docs/audit.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.audit.facts import Fact, Kind, Position, Unreadable, read_fact

OVERLAP = "overlap"
TOKEN_REGRESSED = "token_regressed"
CAPACITY_EXCEEDED = "capacity_exceeded"
NEVER_ENDED = "never_ended"
ENDED_TWICE = "ended_twice"
EXTENDED_AFTER_END = "extended_after_end"
SEED_HELD_TWICE = "seed_held_twice"
CAPTURE_HANDED_OFF_TWICE = "capture_handed_off_twice"
VIOLATION_KINDS = (
    OVERLAP,
    TOKEN_REGRESSED,
    CAPACITY_EXCEEDED,
    NEVER_ENDED,
    ENDED_TWICE,
    EXTENDED_AFTER_END,
    SEED_HELD_TWICE,
    CAPTURE_HANDED_OFF_TWICE,
)
KEPT_VIOLATIONS = 1000  # listed in full; the rest are counted
KEPT_UNREADABLE = 100
CAPACITY_WITNESSES = 4  # live grants named beside a grant over capacity


def when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule, with the events that prove it (the first is the earlier)."""

    kind: str
    subject: str
    detail: str
    at: float
    positions: tuple[Position, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "detail": self.detail,
            "at": when(self.at),
            "events": [p._asdict() for p in self.positions],
        }


@dataclass(slots=True)
class Lease:
    job: str
    account: str | None
    site: str
    granted_at: float
    expires: float
    position: Position
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class Ended:
    at: float
    granted_at: float
    position: Position


@dataclass
class Summary:
    """What a run read and found."""

    events: int = 0
    facts: Counter[str] = field(default_factory=Counter)
    ignored: int = 0  # events that are no part of the lease history
    unreadable: int = 0
    unreadable_examples: list[tuple[Position, str]] = field(default_factory=list)
    duplicates: int = 0  # the same transition published twice (a relay's retry)
    late: int = 0  # facts that came later than the reorder window allowed
    before_window: int = 0  # ends and extensions of leases granted before what was read
    violations: Counter[str] = field(default_factory=Counter)
    live_at_end: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "facts": dict(self.facts),
            "ignored": self.ignored,
            "unreadable": self.unreadable,
            "unreadable_events": [
                {**p._asdict(), "reason": why} for p, why in self.unreadable_examples
            ],
            "duplicates": self.duplicates,
            "late": self.late,
            "before_window": self.before_window,
            "live_at_end": self.live_at_end,
            "violations": {kind: self.violations[kind] for kind in VIOLATION_KINDS},
            "from": None if self.first_at is None else when(self.first_at),
            "to": None if self.last_at is None else when(self.last_at),
        }


class Horizon:
    """A map that forgets entries older than ``seconds`` of history (kept in time order)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: dict[Any, Any] = {}
        self._order: deque[tuple[float, Any]] = deque()

    def put(self, key: Any, at: float, value: Any) -> None:
        self.entries[key] = value
        self._order.append((at, key))

    def forget_before(self, now: float) -> None:
        cutoff = now - self.seconds
        order = self._order
        while order and order[0][0] < cutoff:
            _, key = order.popleft()
            self.entries.pop(key, None)


class Checker:
    """Applies facts in database-clock order and reports what breaks exclusivity."""

    def __init__(
        self,
        *,
        reorder_seconds: float = 300.0,
        grace_seconds: float = 300.0,
        horizon_seconds: float = 3_600.0,
        on_violation: Callable[[Violation], None] | None = None,
    ) -> None:
        self.reorder_seconds = reorder_seconds
        self.grace_seconds = grace_seconds
        self.on_violation = on_violation
        self.summary = Summary()
        self.violations: list[Violation] = []
        self._pending: list[tuple[float, int, int, Fact]] = []
        self._seq = itertools.count()
        self._newest = float("-inf")
        self._applied = float("-inf")
        self.leases: dict[int, Lease] = {}
        self._expiries: list[tuple[float, int]] = []
        self.holders: dict[str, int] = {}  # account -> token of its live lease
        self.last_token: dict[str, tuple[int, Position]] = {}  # account -> its latest grant
        self.first_token: dict[str, int] = {}  # account -> its first token in what was read
        self.last_end: dict[str, tuple[int, float, Position]] = {}  # account -> its latest end
        self.site_live: dict[str, dict[int, None]] = {}  # site -> tokens of its live leases
        self.seeds: dict[str, tuple[int, Position]] = {}  # seed -> holding token
        self.ended = Horizon(horizon_seconds)
        self.handed = Horizon(horizon_seconds)
        self._apply = {
            Kind.GRANT: self._grant,
            Kind.EXTEND: self._extend,
            Kind.END: self._end,
            Kind.SEED_TAKE: self._seed_take,
            Kind.SEED_RETURN: self._seed_return,
            Kind.HANDOFF: self._handoff,
        }

    # --- input ---------------------------------------------------------------------------------

    def add(self, fact: Fact) -> None:
        """One fact; it is applied once the reorder window has passed it."""
        heapq.heappush(self._pending, (fact.at, fact.kind, next(self._seq), fact))
        if fact.at > self._newest:
            self._newest = fact.at
        self._release(self._newest - self.reorder_seconds)

    def feed(self, position: Position, value: bytes | str | None) -> None:
        """An event as read: a fact added, an event of no lease counted, or an unreadable one
        counted and named."""
        self.summary.events += 1
        try:
            fact = read_fact(value, position)
        except Unreadable as exc:
            self.unreadable(position, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - one odd event never stops the audit
            self.unreadable(position, f"{type(exc).__name__} while reading it")
            return
        if fact is None:
            self.summary.ignored += 1
        else:
            self.add(fact)

    def read(self) -> None:
        """An event was read (whatever it turned out to be)."""
        self.summary.events += 1

    def ignore(self) -> None:
        self.summary.ignored += 1

    def unreadable(self, position: Position, reason: str) -> None:
        """An event that could not be read: counted, and the first ones named."""
        self.summary.unreadable += 1
        if len(self.summary.unreadable_examples) < KEPT_UNREADABLE:
            self.summary.unreadable_examples.append((position, reason))

    def lapsed(self, now: float | None = None) -> None:
        """Flag every live lease whose expiry plus the grace is before ``now`` (default: the
        newest fact applied) as never ended; each once."""
        now = self._applied if now is None else now
        expiries = self._expiries
        while expiries and expiries[0][0] + self.grace_seconds < now:
            expires, token = heapq.heappop(expiries)
            lease = self.leases.get(token)
            if lease is None or lease.flagged or lease.expires != expires:
                continue  # ended, flagged, or extended since (a later entry stands for it)
            lease.flagged = True
            self._violate(
                NEVER_ENDED,
                f"lease {token}",
                f"job {lease.job}'s lease (account {lease.account or '-'}) expired at "
                f"{when(expires)} and no end followed within {self.grace_seconds:g}s",
                now,
                (lease.position,),
            )

    def release_until(self, at: float) -> None:
        """Apply every held fact of ``at`` or before (a live audit: nothing older can come now)."""
        self._release(at)

    @property
    def pending(self) -> int:
        """Facts held in the reorder window, not yet applied."""
        return len(self._pending)

    @property
    def newest(self) -> float | None:
        """The database time of the newest fact read."""
        return None if self._newest == float("-inf") else self._newest

    def finish(self) -> Summary:
        """Apply what is still held, flag the leases that never ended, and sum up."""
        self._release(float("inf"))
        self.lapsed()
        self.summary.live_at_end = len(self.leases)
        return self.summary

    @property
    def watermark(self) -> float | None:
        """The database time up to which the history has been applied."""
        return None if self._applied == float("-inf") else self._applied

    # --- applying ------------------------------------------------------------------------------

    def _release(self, upto: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= upto:
            fact = heapq.heappop(pending)[3]
            if fact.at < self._applied:
                self.summary.late += 1
            else:
                self._applied = fact.at
            summary = self.summary
            if summary.first_at is None:
                summary.first_at = fact.at
            summary.last_at = self._applied
            summary.facts[fact.type] += 1
            self.ended.forget_before(self._applied)
            self.handed.forget_before(self._applied)
            self._apply[fact.kind](fact)
        # leases unended past their grace, flagged as the history moves on (not only at the
        # end), so the expiries of leases long gone do not pile up in memory
        self.lapsed()

    def _violate(
        self, kind: str, subject: str, detail: str, at: float, positions: tuple[Position, ...]
    ) -> None:
        violation = Violation(kind, subject, detail, at, positions)
        self.summary.violations[kind] += 1
        if len(self.violations) < KEPT_VIOLATIONS:
            self.violations.append(violation)
        if self.on_violation is not None:
            self.on_violation(violation)

    def _grant(self, fact: Fact) -> None:
        token = fact.token
        known = self.leases.get(token) or self.ended.entries.get(token)
        if known is not None:
            if known.granted_at == fact.at:
                self.summary.duplicates += 1
            else:
                self._violate(
                    TOKEN_REGRESSED,
                    f"lease {token}",
                    f"token {token} granted again (job {fact.subject})",
                    fact.at,
                    (known.position, fact.position),
                )
            return
        account = fact.account
        if account is not None:
            holder = self.holders.get(account)
            held = None if holder is None else self.leases.get(holder)
            if held is not None:
                self._violate(
                    OVERLAP,
                    f"account {account}",
                    f"granted to job {fact.subject} (token {token}) while job {held.job} "
                    f"(token {holder}, granted {when(held.granted_at)}) still held it",
                    fact.at,
                    (held.position, fact.position),
                )
            last = self.last_token.get(account)
            if last is not None and token <= last[0]:
                self._violate(
                    TOKEN_REGRESSED,
                    f"account {account}",
                    f"token {token} (job {fact.subject}) after token {last[0]}",
                    fact.at,
                    (last[1], fact.position),
                )
            else:
                self.last_token[account] = (token, fact.position)
            self.first_token.setdefault(account, token)
            self.holders[account] = token
        live = self.site_live.setdefault(fact.site, {})
        if fact.capacity is not None and len(live) >= fact.capacity:
            witnesses = tuple(
                self.leases[t].position for t in itertools.islice(live, CAPACITY_WITNESSES)
            )
            self._violate(
                CAPACITY_EXCEEDED,
                f"site {fact.site}",
                f"job {fact.subject} (token {token}) granted as live lease {len(live) + 1} "
                f"of a capacity of {fact.capacity}",
                fact.at,
                (*witnesses, fact.position),
            )
        live[token] = None
        assert fact.expires is not None
        self.leases[token] = Lease(fact.subject, account, fact.site, fact.at, fact.expires,
                                   fact.position)  # fmt: skip
        heapq.heappush(self._expiries, (fact.expires, token))

    def _extend(self, fact: Fact) -> None:
        lease = self.leases.get(fact.token)
        if lease is not None:
            assert fact.expires is not None
            if fact.expires > lease.expires:
                lease.expires = fact.expires
                heapq.heappush(self._expiries, (fact.expires, fact.token))
            return
        ended = self.ended.entries.get(fact.token)
        if ended is not None and fact.at > ended.at:
            self._violate(
                EXTENDED_AFTER_END,
                f"lease {fact.token}",
                f"job {fact.subject}'s lease extended after it ended at {when(ended.at)}",
                fact.at,
                (ended.position, fact.position),
            )
        elif ended is None:
            self.summary.before_window += 1
            if fact.account is None or fact.account not in self.last_token:
                self._adopt(fact)

    def _adopt(self, fact: Fact) -> None:
        """A lease granted before the history read began, first seen extended: live from here
        on, so a second grant of its account while it lives is still found (the live auditor
        starts at the topic's end, and ``--since`` starts mid-history). Only for an account not
        seen yet: one seen has its lease history here already."""
        assert fact.expires is not None
        if fact.account is not None:
            self.last_token[fact.account] = (fact.token, fact.position)
            self.first_token.setdefault(fact.account, fact.token)
            self.holders[fact.account] = fact.token
        self.site_live.setdefault(fact.site, {})[fact.token] = None
        self.leases[fact.token] = Lease(fact.subject, fact.account, fact.site, fact.at,
                                        fact.expires, fact.position)  # fmt: skip
        heapq.heappush(self._expiries, (fact.expires, fact.token))

    def _end(self, fact: Fact) -> None:
        token = fact.token
        lease = self.leases.pop(token, None)
        if lease is not None:
            live = self.site_live.get(lease.site)
            if live is not None:
                live.pop(token, None)
                if not live:
                    del self.site_live[lease.site]
            if lease.account is not None:
                if self.holders.get(lease.account) == token:
                    del self.holders[lease.account]
                self.last_end[lease.account] = (token, fact.at, fact.position)
            self.ended.put(token, fact.at, Ended(fact.at, lease.granted_at, fact.position))
            return
        ended = self.ended.entries.get(token)
        if ended is None:
            self._end_beyond_horizon(fact)
        elif ended.at == fact.at:
            self.summary.duplicates += 1
        else:
            self._violate(
                ENDED_TWICE,
                f"lease {token}",
                f"job {fact.subject}'s lease ended again ({fact.type}) after it ended at "
                f"{when(ended.at)}",
                fact.at,
                (ended.position, fact.position),
            )

    def _end_beyond_horizon(self, fact: Fact) -> None:
        """An end of a lease neither live nor ended within the horizon: granted before what was
        read, or a grant refused before it was published (``job.rejected``), unless its account's
        tokens say its grant was read and so it ended before."""
        account = fact.account
        first = None if account is None else self.first_token.get(account)
        if fact.type == "job.rejected" or first is None or fact.token < first:
            self.summary.before_window += 1
            return
        assert account is not None
        last = self.last_end.get(account)
        if last is not None and last[0] == fact.token and last[1] == fact.at:
            self.summary.duplicates += 1
            return
        proof = (last[2], fact.position) if last is not None and last[0] == fact.token else ()
        self._violate(
            ENDED_TWICE,
            f"lease {fact.token}",
            f"job {fact.subject}'s lease (account {account}) ended again ({fact.type}); its "
            f"grant was read, and it was no longer live",
            fact.at,
            proof or (fact.position,),
        )

    def _seed_take(self, fact: Fact) -> None:
        held = self.seeds.get(fact.subject)
        if held is not None:
            if held[0] == fact.token:
                self.summary.duplicates += 1
                return
            holder = self.leases.get(held[0])
            if holder is not None:
                self._violate(
                    SEED_HELD_TWICE,
                    f"seed {fact.subject}",
                    f"handed to lease {fact.token} while lease {held[0]} (job {holder.job}) "
                    "still held it",
                    fact.at,
                    (held[1], fact.position),
                )
        self.seeds[fact.subject] = (fact.token, fact.position)

    def _seed_return(self, fact: Fact) -> None:
        held = self.seeds.get(fact.subject)
        if held is not None and held[0] == fact.token:
            del self.seeds[fact.subject]

    def _handoff(self, fact: Fact) -> None:
        before = self.handed.entries.get(fact.subject)
        if before is None:
            self.handed.put(fact.subject, fact.at, (fact.token, fact.position))
        elif before[0] == fact.token:
            self.summary.duplicates += 1
        else:
            self._violate(
                CAPTURE_HANDED_OFF_TWICE,
                f"capture {fact.subject}",
                f"handed off again (handoff token {fact.token}; the first: {before[0]})",
                fact.at,
                (before[1], fact.position),
            )
