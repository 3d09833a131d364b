"""`qm bench audit`: the checker of `qm audit leases` over a synthetic history of ``--events``
events, as the relay publishes them (JSON, a third of them of no lease); events per second and
the process's peak memory.

The history is a clean one made by a small simulation (sites, accounts, capacity, grants with
their seed hand-outs, heartbeats, ends with seed returns, capture hand-offs), made in batches
outside the timed part, so the figure is the audit's alone: parsing each event and checking it.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console

console = Console()
Opt = typer.Option
BATCH = 10_000


class History:
    """A clean lease history: every site under its capacity, every account held by one lease."""

    def __init__(self, sites: int, accounts: int, capacity: int, rate: float) -> None:
        self.rng = random.Random(25)
        self.capacity = capacity
        self.step = 1 / rate  # seconds of database time between two events
        self.at = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
        self.token = 0
        self.captures = 0
        self.free = [[f"{s}-{a}" for a in range(accounts)] for s in range(sites)]
        self.live: list[list[tuple[int, str, str, list[str]]]] = [[] for _ in range(sites)]
        self.seeds = [[f"{s}{n:05d}" for n in range(200)] for s in range(sites)]

    def _event(self, type_: str, entity: str, id_: str, site: int, **fields: object) -> bytes:
        self.at += self.step
        when = datetime.fromtimestamp(self.at, UTC).isoformat()
        doc = {"type": type_, "v": 1, "entity": entity, "id": id_, "site": f"site-{site}",
               "status": "RUNNING", "at": when, **fields}  # fmt: skip
        if "lease_token" in fields or "handoff_token" in fields:
            doc["db_at"] = when
        return json.dumps(doc).encode()

    def events(self, count: int) -> Iterator[bytes]:
        made = 0
        while made < count:
            for event in self._next():
                yield event
                made += 1

    def _next(self) -> list[bytes]:
        rng = self.rng
        site = rng.randrange(len(self.live))
        live = self.live[site]
        if live and (len(live) >= self.capacity or not self.free[site] or rng.random() < 0.45):
            index = rng.randrange(len(live))
            token, job, account, held = live[index]
            expires = datetime.fromtimestamp(self.at + 120, UTC).isoformat()
            if rng.random() < 0.3:
                return [self._event("job.extended", "job", job, site, lease_token=token,
                                    account_id=account, lease_expires_at=expires)]  # fmt: skip
            live[index] = live[-1]
            live.pop()
            out = [self._event("job.finished", "job", job, site, lease_token=token,
                               account_id=account, lease_expires_at=expires)]  # fmt: skip
            for seed in held:
                out.append(self._event("seed.done", "seed", seed, site, lease_token=token,
                                       job_id=job))  # fmt: skip
                self.seeds[site].append(seed)
            out.append(self._event("account.released", "account", account, site, job_id=job))
            self.free[site].append(account)
            return out
        self.token += 1
        token, job = self.token, f"job-{self.token}"
        account = self.free[site].pop(rng.randrange(len(self.free[site])))
        expires = datetime.fromtimestamp(self.at + 60, UTC).isoformat()
        out = [
            self._event("job.queued", "job", job, site),
            self._event(
                "job.granted",
                "job",
                job,
                site,
                lease_token=token,
                account_id=account,
                lease_expires_at=expires,
                capacity=self.capacity,
            ),
        ]
        held = [self.seeds[site].pop() for _ in range(min(2, len(self.seeds[site])))]
        for seed in held:
            out.append(self._event("seed.assigned", "seed", seed, site, lease_token=token,
                                   job_id=job))  # fmt: skip
        if rng.random() < 0.3:
            self.captures += 1
            out.append(self._event("capture.handed_off", "capture", f"cap-{self.captures}", site,
                                   job_id=job, handoff_token=10**12 + self.captures))  # fmt: skip
        live.append((token, job, account, held))
        return out


def bench_audit(
    events: Annotated[int, Opt(help="Events in the history.")] = 1_000_000,
    sites: Annotated[int, Opt(help="Sites of the history.")] = 20,
    accounts: Annotated[int, Opt(help="Accounts of each site.")] = 50,
    capacity: Annotated[int, Opt(help="Capacity of each site.")] = 40,
    rate: Annotated[float, Opt(help="Events per second of database time.")] = 1_000.0,
) -> None:
    """Events per second of `qm audit leases` (parse and check) and its peak memory."""
    from app.audit.checker import Checker
    from app.audit.facts import Position

    history = History(sites, min(accounts, 10_000), max(1, min(capacity, accounts)), rate)
    checker = Checker()
    source = history.events(events)
    checked = 0
    spent = 0.0
    rss_before = _peak_rss_mb()
    console.print(f"audit bench: {events:,} events, {sites} sites of {accounts} accounts "
                  f"(capacity {capacity}), {rate:g} events/s of database time")  # fmt: skip
    while checked < events:
        batch = [next(source) for _ in range(min(BATCH, events - checked))]
        started = time.perf_counter()
        for offset, value in enumerate(batch, checked):
            checker.feed(Position("bench", 0, offset), value)
        spent += time.perf_counter() - started
        checked += len(batch)
    held = (
        f"held at the end: {len(checker.leases):,} live leases, {len(checker.ended.entries):,} "
        f"ended leases and {len(checker.handed.entries):,} hand-offs of the last "
        f"{checker.ended.seconds:g} s, {checker.pending:,} events in the reorder window"
    )
    started = time.perf_counter()
    summary = checker.finish()
    spent += time.perf_counter() - started
    violations = sum(summary.violations.values())
    console.print(
        f"{checked:,} events in {spent:.1f} s: [bold]{checked / spent:,.0f} events/s[/]; "
        f"peak memory (RSS) {_peak_rss_mb():,.0f} MB (before the run {rss_before:,.0f} MB); "
        f"{summary.facts.total():,} lease facts, {summary.ignored:,} events of no lease, "
        f"{violations} violations, {summary.unreadable} unreadable"
    )
    console.print(held)
    if violations or summary.unreadable:
        raise typer.Exit(1)  # the history is clean: a violation here is the checker's error


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
