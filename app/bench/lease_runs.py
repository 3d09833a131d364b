"""The lease bench's measured runs through the SDK: paced job.start -> job.granted, and job
cycles (start, heartbeat, finish) back to back."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.bench.processes import BenchFailed, Child
from app.sdk import QuartermasterClient
from app.sdk.job import Job

WARMUP_SECONDS = 1.0  # latency samples scheduled in the first second are left out
LEASE_SECONDS = 900  # the latency run's jobs hold their leases to the end: no expiry inside a run
CYCLE_LEASE_SECONDS = 60  # the cycle run's short leases, extended once per cycle
REQUEST_TIMEOUT = 60.0
MAX_RATE_P99_MS = 250.0  # what "sustained" means in the max-rate search


@dataclass(slots=True)
class Figure:
    """One row of the table."""

    name: str
    target_rate: float | None = None
    samples: list[float] = field(default_factory=list)
    sent: int = 0
    seconds: float = 0.0  # from the first send to the last send (paced) or to the end (max)
    failures: int = 0
    cycles_per_second: float | None = None
    requests_per_cycle: int = 1
    note: str = ""  # printed under the table

    @property
    def requests(self) -> int:
        return self.sent * self.requests_per_cycle

    def sustained(self, p99_ms: float) -> bool:
        """No failure, at least 90% of the target rate, and a p99 under ``p99_ms``."""
        achieved = (self.sent - 1) / self.seconds if self.seconds else 0.0
        p99 = percentile_ms(self.samples, 99)
        return (
            self.failures == 0
            and achieved >= 0.9 * (self.target_rate or 0.0)
            and p99 is not None
            and p99 < p99_ms
        )


def percentile_ms(samples: Sequence[float], percentile: int) -> float | None:
    """The ``percentile`` of ``samples`` in milliseconds; None for fewer than two."""
    if len(samples) < 2:
        return None
    return 1000 * statistics.quantiles(samples, n=100, method="inclusive")[percentile - 1]


async def cycle(client: QuartermasterClient, site: str) -> None:
    """One job cycle: start (granted), one heartbeat, finish."""
    async with client.job(
        site=site, lease_seconds=CYCLE_LEASE_SECONDS, wait_seconds=30, timeout=REQUEST_TIMEOUT
    ) as job:
        await job.heartbeat(CYCLE_LEASE_SECONDS)


async def warm_up(
    clients: Sequence[QuartermasterClient], slugs: Sequence[str], children: Sequence[Child]
) -> None:
    """Cycles on every client and site until they all go through: the consumers have joined."""
    deadline = time.monotonic() + 90
    while True:
        jobs = (cycle(clients[n % len(clients)], slugs[n % len(slugs)]) for n in range(32))
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), timeout=20)
            return
        except (TimeoutError, OSError) as exc:
            for child in children:
                child.check()
            if time.monotonic() > deadline:
                tails = "\n".join(f"{c.process} log:\n{c.tail()}" for c in children)
                raise BenchFailed(
                    f"no warm-up job went through in 90 s ({exc!r});\n{tails}"
                ) from exc


async def paced(
    rate: float, count: int, send: Callable[[int, float], Coroutine[Any, Any, None]]
) -> float:
    """Start ``send(n, scheduled_at)`` as a task at ``start + n / rate``; await them all.

    Open loop: a send never waits for earlier ones. Returns the seconds from the first send to
    the last.
    """
    start = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for n in range(count):
        scheduled = start + n / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load, not waiting for a condition
        tasks.append(asyncio.create_task(send(n, scheduled)))
    spread = time.monotonic() - start
    await asyncio.gather(*tasks)
    return spread


async def start_latency(
    clients: Sequence[QuartermasterClient],
    slugs: Sequence[str],
    rate: float,
    count: int,
    sent: Callable[[], object] = lambda: None,
) -> Figure:
    """job.start -> job.granted at ``rate``; every job holds its account until all ``count``
    are sent and answered, then ``sent()`` is called (what follows is clean-up) and all finish."""
    figure = Figure("job.start → job.granted, SDK", target_rate=rate, sent=count)
    held: list[Job] = []
    first = time.monotonic()

    async def start(n: int, scheduled: float) -> None:
        job = clients[n % len(clients)].job(
            site=slugs[n % len(slugs)], lease_seconds=LEASE_SECONDS, wait_seconds=30
        )
        try:
            await job.__aenter__()
        except Exception:  # noqa: BLE001 - counted as a failure; the run goes on
            figure.failures += 1
            return
        if scheduled - first >= WARMUP_SECONDS:
            figure.samples.append(time.monotonic() - scheduled)
        held.append(job)

    figure.seconds = await paced(rate, count, start)
    sent()  # the releases below are clean-up, not part of the run
    finished = await asyncio.gather(
        *(job.__aexit__(None, None, None) for job in held), return_exceptions=True
    )
    if unconfirmed := sum(isinstance(result, BaseException) for result in finished):
        figure.note = f"{unconfirmed} of {len(held)} finishes after the latency run unconfirmed"
    return figure


async def cycles(
    clients: Sequence[QuartermasterClient],
    slugs: Sequence[str],
    *,
    concurrency: int,
    count: int,
    seconds: float,
) -> Figure:
    """Job cycles back to back on ``concurrency`` loops, at most ``count`` in ``seconds``."""
    figure = Figure(f"job cycle (start+heartbeat+finish) x{concurrency}, SDK")
    figure.requests_per_cycle = 3
    begin = time.monotonic()
    deadline = begin + seconds
    left = [count]

    async def loop(k: int) -> None:
        client, site = clients[k % len(clients)], slugs[k % len(slugs)]
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            started = time.monotonic()
            try:
                await cycle(client, site)
            except Exception:  # noqa: BLE001 - counted as a failure; the run goes on
                figure.failures += 1
                continue
            figure.sent += 1
            if started - begin >= WARMUP_SECONDS:
                figure.samples.append(time.monotonic() - started)

    await asyncio.gather(*(loop(k) for k in range(concurrency)))
    figure.seconds = time.monotonic() - begin
    figure.cycles_per_second = figure.sent / figure.seconds
    return figure


async def search_max_rate(
    probe: Callable[[float], Awaitable[Figure]], *, start: float, ceiling: float, steps: int
) -> tuple[float | None, list[str]]:
    """The highest rate ``probe`` sustains, in at most ``steps`` probes: double from ``start``
    (up to ``ceiling``) until a probe fails, then bisect between the best and the failed rate.
    Returns it (None: not even the lowest probe) and each probe as "rate ok|no"."""
    best: float | None = None
    failed: float | None = None
    rate, tried = start, []
    for _ in range(steps):
        ok = (await probe(rate)).sustained(MAX_RATE_P99_MS)
        tried.append(f"{rate:,.0f}/s {'ok' if ok else 'no'}")
        best, failed = (rate, failed) if ok else (best, rate)
        if failed is None:
            if rate >= ceiling:
                break
            rate = min(rate * 2, ceiling)
        else:
            rate = ((best or 0.0) + failed) / 2
            if failed - rate < max(start / 8, 1.0):  # closer than that is noise
                break
    return best, tried
