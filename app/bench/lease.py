"""`qm bench lease`: the leasing path end to end through the SDK, next to a raw Kafka round trip.

One run against real services (a Kafka broker and a durable PostgreSQL, started here unless
``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` name them) with the real claim worker and outbox
relay as child processes (`python -m app run worker`, `python -m app run relay`). It prints:

- a raw Kafka round trip: a requester produces to a topic, an echo task in this process consumes
  each record and produces a reply, the requester consumes the reply; paced like the next figure;
- ``job.start -> job.granted`` through the SDK at a target rate, open loop: starts leave on
  schedule whatever the replies do, and each latency counts from the scheduled send (a late
  sender counts against the result). Every granted job holds its account until the run ends (the
  sites get enough accounts), so the request rate is the rate of job.start requests;
- full job cycles (start, one heartbeat, finish, on short leases) per second at max throughput,
  ``--concurrency`` job loops back to back;
- with ``--search-steps`` > 0, the highest start rate each path sustains (p99 under 250 ms, no
  failures, 90% of the target achieved), found by doubling and then halving the step.

The CPU each process used in each run is printed under the table (from /proc), with the WAL
bytes per request (``pg_current_wal_lsn`` before and after) and the claim worker's RSS.
``--history N`` preloads N finished jobs (grants, inbox rows, delivered captures), settled seeds
with their holds, and 10,000 accounts per site (``app.bench.history.preload``);
``--json`` prints one JSON object instead of the table. The collectors share one reply topic,
each reading one partition of it, as the SDK does by default (``--no-route-replies``: each reads
the whole topic, as clients that do not route do; ``--own-reply-topics``: a topic each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import typer
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console

from app.bench import history, repeats
from app.bench.echo import create_topics, echo
from app.bench.lease_report import Report, own_cpu, table
from app.bench.lease_runs import (
    LEASE_SECONDS,
    REQUEST_TIMEOUT,
    Figure,
    cycles,
    search_max_rate,
    start_latency,
    warm_up,
)
from app.bench.processes import BenchFailed, Child, CpuMeter, rss_mb
from app.bench.services import bench_names, run_database
from app.bench.services import services as start_services
from app.kafka import ensure_topics, sdk_client
from app.logs import configure_logging
from app.sdk import QuartermasterClient
from app.sealing import private_key_text
from app.settings import Settings

err = Console(stderr=True)
Opt = typer.Option


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run does."""

    rate: float
    duration: float
    collectors: int
    concurrency: int
    cycles: int
    seconds: float
    sites: int
    consumers: int | None
    warmup: float = 15.0
    workers: int = 1
    own_reply_topics: bool = False
    route_replies: bool = True  # each collector of the shared reply topic reads one partition
    history: int = 0
    search_steps: int = 0
    search_seconds: float = 3.0
    search_ceiling: float = 1600.0
    # the echo's search climbs to its own ceiling: where its p99 passes the bound
    echo_search_steps: int = 12
    echo_ceiling: float = 200_000.0
    budgets: bool = False  # use budgets on every site, set so that they never hold a job back

    @property
    def starts(self) -> int:
        return max(int(self.rate * self.duration), 2)

    @property
    def accounts_per_site(self) -> int:
        probe = self.search_ceiling * self.search_seconds if self.search_steps else 0
        held = max(self.starts, int(probe)) + 4 * self.sites  # held until a run ends; warm-up
        return max(math.ceil(held / self.sites), math.ceil(self.concurrency / self.sites)) + 2


def bench_lease(
    rate: Annotated[float, Opt(help="job.start requests per second of the latency run.")] = 500.0,
    duration: Annotated[float, Opt(help="Seconds of the latency run and of the echo run.")] = 10.0,
    collectors: Annotated[int, Opt(help="SDK clients (collectors) sharing the load.")] = 4,
    concurrency: Annotated[int, Opt(help="Job loops of the cycle run, back to back.")] = 32,
    cycles: Annotated[int, Opt(help="At most this many cycles in the cycle run.")] = 50_000,
    seconds: Annotated[float, Opt(help="At most this many seconds of the cycle run.")] = 10.0,
    n_sites: Annotated[int, Opt("--sites", help="Sites the jobs are spread over.")] = 8,
    workers: Annotated[int, Opt(help="Claim worker processes (one consumer group).")] = 1,
    consumers: Annotated[int | None, Opt(help="QM_WORKER_CONSUMERS of each worker.")] = None,
    warmup: Annotated[float, Opt(help="Seconds of unmeasured cycles before the runs.")] = 15.0,
    own_reply_topics: Annotated[
        bool, Opt(help="Each collector gets a reply topic of its own instead of sharing one.")
    ] = False,
    route_replies: Annotated[
        bool,
        Opt(
            help="Collectors of the shared reply topic each read one partition of it (as the "
            "SDK does by default); --no-route-replies: each reads all of it."
        ),
    ] = True,
    history_jobs: Annotated[int, Opt("--history", help=history.HISTORY_HELP)] = 0,
    search_steps: Annotated[
        int, Opt(help="Probes of the max-rate search per path (0: no search).")
    ] = 5,
    search_seconds: Annotated[float, Opt(help="Seconds of each max-rate probe.")] = 3.0,
    search_ceiling: Annotated[float, Opt(help="The highest start rate the search tries.")] = 1600.0,
    echo_search_steps: Annotated[
        int, Opt(help="Probes of the echo's max-rate search (0: no echo search).")
    ] = 12,
    echo_ceiling: Annotated[
        float, Opt(help="The highest rate the echo's search tries.")
    ] = 200_000.0,
    repeat: Annotated[
        int, Opt(help="Runs, back to back; prints each figure's median and range.")
    ] = 1,
    budgets: Annotated[
        bool,
        Opt(
            help="Use budgets on every site (per account and per minute, docs/policy.md), set so "
            "that they never hold a job back: what checking them costs."
        ),
    ] = False,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object, not the table.")] = False,
) -> None:
    """job.start -> job.granted latency, job cycles per second, and a raw Kafka round trip."""
    configure_logging("console", "WARNING")  # the SDK's info line per job would drown the table
    plan = Plan(rate=rate, duration=duration, collectors=max(collectors, 1),
                concurrency=max(concurrency, 1), cycles=cycles, seconds=seconds,
                sites=max(n_sites, 1), consumers=consumers, warmup=warmup,
                workers=max(workers, 1), own_reply_topics=own_reply_topics,
                route_replies=route_replies,
                history=max(history_jobs, 0), search_steps=max(search_steps, 0),
                search_seconds=search_seconds, search_ceiling=search_ceiling,
                echo_search_steps=max(echo_search_steps, 0),
                echo_ceiling=echo_ceiling, budgets=budgets)  # fmt: skip
    repeat = max(repeat, 1)
    console = err if as_json else Console(width=max(Console().width, 132))
    try:
        with start_services() as services:
            console.print(
                f"lease bench: Kafka {services.bootstrap}; PostgreSQL {services.durability}; "
                f"{os.cpu_count()} CPUs; {plan.collectors} collectors; {plan.sites} sites x "
                f"{plan.accounts_per_site} accounts; {plan.workers} claim worker(s) and a relay as "
                "child processes (`python -m app run worker|relay`); "
                + ("a reply topic per collector" if own_reply_topics else "one shared reply topic")
                + ("" if own_reply_topics or not route_replies else ", a partition per collector")
                + ("; use budgets on (never holding a job back)" if budgets else "")
            )
            summaries = []
            for run in range(repeat):
                # each run its own database, topics, groups and child processes
                with run_database(services, run) as database_url:
                    settings = bench_settings(services.bootstrap, database_url)
                    slugs = [f"site{n}" for n in range(plan.sites)]
                    report = asyncio.run(_bench(settings, plan, slugs, services.pids, console))
                summaries.append(report.summary())
                if as_json:
                    print(json.dumps(summaries[-1]), flush=True)
                    continue
                if repeat > 1:
                    console.print(f"run {run + 1} of {repeat}")
                console.print(table([report.echo, report.granted, report.cycles]))
                for line in report.notes():
                    console.print(line)
    except BenchFailed as exc:  # a service that cannot start is one red line (app.cli.main)
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if repeat == 1:
        return
    merged = repeats.medians(summaries)
    if as_json:  # the last line: the medians, with their ranges
        print(json.dumps(merged))
        return
    console.print(f"medians of {repeat} runs (lowest to highest):")
    for line in repeats.lines(merged):
        console.print(f"  {line}")


def bench_settings(bootstrap: str, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        **bench_names(),
        secret_keys=Fernet.generate_key().decode(),
        sealing_keys=private_key_text(X25519PrivateKey.generate()),
    )


async def _bench(
    settings: Settings, plan: Plan, slugs: list[str], pids: dict[str, int], console: Console
) -> Report:
    await ensure_topics(settings)
    reply_topics = [settings.topic("replies")] * plan.collectors
    if plan.own_reply_topics:
        reply_topics = [settings.topic(f"replies.c{n}") for n in range(plan.collectors)]
        await create_topics(settings, reply_topics)
    await history.make_sites(
        settings, slugs, accounts_per_site=plan.accounts_per_site, lease_seconds=LEASE_SECONDS,
        budgets=plan.budgets,
    )  # fmt: skip
    loaded = await history.preload(
        settings, slugs, plan.history
    )  # VACUUM (ANALYZE) even without history
    if plan.history:
        console.print(loaded.line())
    extra = {} if plan.consumers is None else {"worker_consumers": plan.consumers}
    names = [f"worker{n}" if plan.workers > 1 else "worker" for n in range(plan.workers)]
    with contextlib.ExitStack() as processes:
        children = {name: processes.enter_context(Child(settings, "worker", **extra))
                    for name in names}  # fmt: skip
        children["relay"] = processes.enter_context(Child(settings, "relay"))
        meter = CpuMeter({**{name: c.proc.pid for name, c in children.items()}, **pids})
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    sdk_client(
                        settings,
                        request_timeout=REQUEST_TIMEOUT,
                        reply_topic=topic,
                        route_replies=plan.route_replies,
                    )
                )
                for topic in reply_topics
            ]
            await warm_up(clients, slugs, list(children.values()))
            # warm the broker's JIT, the connection pools and prepared statements; not measured
            await cycles(clients, slugs, concurrency=plan.concurrency, count=plan.cycles,
                         seconds=plan.warmup)  # fmt: skip
            await history.restat(settings)  # statistics of tables with rows, as a server's
            runner = _Runner(settings, plan, clients, slugs, meter, children)
            return await runner.run()


class _Runner:
    """The measured runs, each with the CPU and WAL it cost, then the max-rate searches."""

    def __init__(
        self,
        settings: Settings,
        plan: Plan,
        clients: Sequence[QuartermasterClient],
        slugs: Sequence[str],
        meter: CpuMeter,
        children: dict[str, Child],
    ) -> None:
        self.settings, self.plan, self.clients, self.slugs = settings, plan, clients, slugs
        self.meter, self.children = meter, children
        self.wal = history.WalMeter(settings)
        self.rss = 0.0

    async def run(self) -> Report:
        plan = self.plan
        try:
            echoed = await self._measured("echo", self._echo)
            granted = await self._measured("latency", self._granted)
            cycled = await self._measured("cycle", self._cycles)
            report = Report(echoed[0], granted[0], cycled[0], history=plan.history)
            report.cpu_lines = [echoed[1], granted[1], cycled[1]]
            report.wal_bytes_per_request = {"granted": granted[2], "cycle": cycled[2]}
            report.cpu_ms_per_request = cycled[3]
            if plan.search_steps:
                await self._search(report)
            report.worker_rss_mb = self.rss
            return report
        finally:
            await self.wal.close()

    async def _echo(self) -> Figure:
        return await echo(self.settings, self.plan.rate, self.plan.starts)

    async def _granted(self) -> Figure:
        plan = self.plan
        return await start_latency(self.clients, self.slugs, plan.rate, plan.starts, self.meter.end)

    async def _cycles(self) -> Figure:
        plan = self.plan
        return await cycles(
            self.clients, self.slugs, concurrency=plan.concurrency, count=plan.cycles,
            seconds=plan.seconds,
        )  # fmt: skip

    async def _measured(
        self, label: str, run: Callable[[], Awaitable[Figure]]
    ) -> tuple[Figure, str, float, dict[str, float]]:
        """A run with its CPU line, WAL bytes per request and CPU ms per request by process."""
        await self.wal.begin()  # its checkpoint first, so its own work is not the run's CPU
        self.meter.begin()
        figure = await run()
        wal = await self.wal.end()
        requests = figure.requests
        self._check()
        line = self.meter.report(f"the {label} run", requests)
        return figure, line, wal / max(requests, 1), self.meter.per_request(requests)

    def _check(self) -> None:
        for name, child in self.children.items():
            child.check()
            if name.startswith("worker"):
                self.rss = max(self.rss, rss_mb(child.proc.pid))

    async def _search(self, report: Report) -> None:
        """The highest rate each path sustains: double until it fails, then halve the step."""
        seconds = self.plan.search_seconds

        async def probe_echo(rate: float) -> Figure:
            return await echo(self.settings, rate, max(int(rate * seconds), 2))

        own_at: dict[float, float] = {}  # Quartermaster's own CPU ms per request, by probe rate

        async def probe_granted(rate: float) -> Figure:
            count = max(int(rate * seconds), 2)
            self.meter.begin()
            figure = await start_latency(self.clients, self.slugs, rate, count, self.meter.end)
            own_at[rate] = own_cpu(self.meter.per_request(figure.requests))
            self._check()
            return figure

        plan = self.plan
        best, tried = await search_max_rate(
            probe_echo, start=plan.rate, ceiling=plan.echo_ceiling, steps=plan.echo_search_steps
        )
        report.search.append("echo " + ", ".join(tried))
        report.echo_max_rate = best
        best, tried = await search_max_rate(
            probe_granted, start=plan.rate, ceiling=plan.search_ceiling, steps=plan.search_steps
        )
        report.search.append("granted " + ", ".join(tried))
        report.max_rate = best
        report.own_cpu_ms_per_request_at_max = None if best is None else own_at.get(best)
