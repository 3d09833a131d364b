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
- full job cycles (start, then finish) per second at max throughput, ``--concurrency`` job loops
  back to back.

The CPU each process used in each run is printed under the table (from /proc), to show the
bottleneck on a small machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.structs import TopicPartition
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rich.console import Console
from rich.table import Table

from app.bench.processes import BenchFailed, Child, CpuMeter
from app.bench.services import services as start_services
from app.crypto import SecretBox, private_key_text
from app.db.engine import make_engine
from app.kafka import client_options, ensure_topics, producer_options
from app.logs import configure_logging
from app.sdk import QuartermasterClient
from app.sdk.job import Job
from app.settings import Settings
from app.store import accounts, sites

console = Console(width=max(Console().width, 132))  # the table is wider than a pipe's 80
err = Console(stderr=True)
Opt = typer.Option

WARMUP_SECONDS = 1.0  # latency samples scheduled in the first second are left out
LEASE_SECONDS = 900  # no heartbeat or expiry falls inside a run
REQUEST_TIMEOUT = 60.0
ECHO_PAYLOAD = b"x" * 300  # about the size of a job.start


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

    @property
    def starts(self) -> int:
        return max(int(self.rate * self.duration), 2)

    @property
    def accounts_per_site(self) -> int:
        held = self.starts + 4 * self.sites  # every start holds one until the end; warm-up
        return max(math.ceil(held / self.sites), math.ceil(self.concurrency / self.sites)) + 2


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
    note: str = ""  # printed under the table


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
) -> None:
    """job.start -> job.granted latency, job cycles per second, and a raw Kafka round trip."""
    configure_logging("console", "WARNING")  # the SDK's info line per job would drown the table
    plan = Plan(rate=rate, duration=duration, collectors=max(collectors, 1),
                concurrency=max(concurrency, 1), cycles=cycles, seconds=seconds,
                sites=max(n_sites, 1), consumers=consumers, warmup=warmup,
                workers=max(workers, 1), own_reply_topics=own_reply_topics)  # fmt: skip
    try:
        with start_services() as services:
            console.print(
                f"lease bench: Kafka {services.bootstrap}; PostgreSQL {services.durability}; "
                f"{os.cpu_count()} CPUs; {plan.collectors} collectors; {plan.sites} sites x "
                f"{plan.accounts_per_site} accounts; {plan.workers} claim worker(s) and a relay as "
                "child processes (`python -m app run worker|relay`); "
                + ("a reply topic per collector" if own_reply_topics else "one shared reply topic")
            )
            settings = _settings(services.bootstrap, services.database_url)
            figures, cpu = asyncio.run(_bench(settings, plan, services.pids))
    except BenchFailed as exc:  # a service that cannot start is one red line (app.cli.main)
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(_table(figures))
    for note in (f.note for f in figures if f.note):
        console.print(note)
    for line in cpu:
        console.print(line)


# --- services and processes ---------------------------------------------------------------


def _settings(bootstrap: str, database_url: str) -> Settings:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        consumer_group=f"{prefix}workers",
        secret_keys=Fernet.generate_key().decode(),
        sealing_keys=private_key_text(X25519PrivateKey.generate()),
    )


# --- the run -------------------------------------------------------------------------------


async def _bench(
    settings: Settings, plan: Plan, pids: dict[str, int]
) -> tuple[list[Figure], list[str]]:
    await ensure_topics(settings)
    reply_topics = [settings.topic("replies")] * plan.collectors
    if plan.own_reply_topics:
        reply_topics = [settings.topic(f"replies.c{n}") for n in range(plan.collectors)]
        await _create_topics(settings, reply_topics)
    slugs = await _make_sites(settings, plan)
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
                    QuartermasterClient.from_settings(
                        settings, request_timeout=REQUEST_TIMEOUT, reply_topic=topic
                    )
                )
                for topic in reply_topics
            ]
            await _warm_up(clients, slugs, list(children.values()))
            # warm the broker's JIT, the connection pools and prepared statements; not measured
            await _cycles(clients, slugs, replace(plan, seconds=plan.warmup))
            return await _runs(settings, plan, clients, slugs, meter, list(children.values()))


async def _runs(
    settings: Settings,
    plan: Plan,
    clients: Sequence[QuartermasterClient],
    slugs: Sequence[str],
    meter: CpuMeter,
    children: Sequence[Child],
) -> tuple[list[Figure], list[str]]:
    """The three measured runs, each with the CPU every process used in it."""
    figures, cpu = [], []
    runs: list[tuple[str, Callable[[], Awaitable[Figure]]]] = [
        ("the echo run", lambda: _echo(settings, plan)),
        ("the latency run", lambda: _start_latency(clients, slugs, plan, meter)),
        ("the cycle run", lambda: _cycles(clients, slugs, plan)),
    ]
    for label, run in runs:
        meter.begin()
        figure = await run()
        figures.append(figure)
        requests = figure.sent * (2 if figure.cycles_per_second is not None else 1)
        cpu.append(meter.report(label, requests))
        for child in children:
            child.check()
    return figures, cpu


async def _make_sites(settings: Settings, plan: Plan) -> list[str]:
    """``plan.sites`` sites, each with enough ACTIVE accounts that no start has to wait."""
    sealed = SecretBox.from_settings(settings).seal("bench-secret")  # sealing is not measured
    engine = make_engine(settings, pool_size=1)
    slugs = [f"site{n}" for n in range(plan.sites)]
    try:
        async with engine.begin() as conn:
            for slug in slugs:
                await sites.add_site(
                    conn, slug=slug, host=f"{slug}.example.com", capacity=plan.accounts_per_site,
                    lease_seconds=LEASE_SECONDS, cooldown_seconds=0,
                )  # fmt: skip
                for n in range(plan.accounts_per_site):
                    await accounts.add_account(
                        conn, site=slug, username=f"user{n}@{slug}", sealed_secret=sealed
                    )
    finally:
        await engine.dispose()
    return slugs


async def _cycle(client: QuartermasterClient, site: str) -> None:
    async with client.job(site=site, lease_seconds=LEASE_SECONDS, wait_seconds=30):
        pass


async def _warm_up(
    clients: Sequence[QuartermasterClient], slugs: Sequence[str], children: Sequence[Child]
) -> None:
    """Cycles on every client and site until they all go through: the consumers have joined."""
    deadline = time.monotonic() + 90
    while True:
        jobs = (_cycle(clients[n % len(clients)], slugs[n % len(slugs)]) for n in range(32))
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


async def _paced(
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


async def _start_latency(
    clients: Sequence[QuartermasterClient], slugs: Sequence[str], plan: Plan, meter: CpuMeter
) -> Figure:
    """job.start -> job.granted at ``plan.rate``; every job holds its account until the end."""
    figure = Figure("job.start → job.granted, SDK", target_rate=plan.rate, sent=plan.starts)
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

    figure.seconds = await _paced(plan.rate, plan.starts, start)
    meter.end()  # the releases below are clean-up, not part of the run
    finished = await asyncio.gather(
        *(job.__aexit__(None, None, None) for job in held), return_exceptions=True
    )
    if unconfirmed := sum(isinstance(result, BaseException) for result in finished):
        figure.note = f"{unconfirmed} of {len(held)} finishes after the latency run unconfirmed"
    return figure


async def _cycles(
    clients: Sequence[QuartermasterClient], slugs: Sequence[str], plan: Plan
) -> Figure:
    """Job cycles back to back on ``plan.concurrency`` loops, bounded in count and time."""
    figure = Figure(f"job cycle (start+finish) x{plan.concurrency}, SDK")
    begin = time.monotonic()
    deadline = begin + plan.seconds
    left = [plan.cycles]

    async def loop(k: int) -> None:
        client, site = clients[k % len(clients)], slugs[k % len(slugs)]
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            started = time.monotonic()
            try:
                await _cycle(client, site)
            except Exception:  # noqa: BLE001 - counted as a failure; the run goes on
                figure.failures += 1
                continue
            figure.sent += 1
            if started - begin >= WARMUP_SECONDS:
                figure.samples.append(time.monotonic() - started)

    await asyncio.gather(*(loop(k) for k in range(plan.concurrency)))
    figure.seconds = time.monotonic() - begin
    figure.cycles_per_second = figure.sent / figure.seconds
    return figure


# --- the raw Kafka round trip ---------------------------------------------------------------


async def _echo(settings: Settings, plan: Plan) -> Figure:
    """Request, echo, reply through the broker at ``plan.rate``: what Kafka alone costs."""
    figure = Figure("raw Kafka round trip (echo)", target_rate=plan.rate, sent=plan.starts)
    asks, answers = settings.topic("bench-echo"), settings.topic("bench-echo-replies")
    await _create_topics(settings, [asks, answers])
    waiting: dict[bytes, asyncio.Future[float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        requester, echoer = [AIOKafkaProducer(**producer_options(settings)) for _ in "ab"]
        for producer in (requester, echoer):
            await producer.start()
            stack.push_async_callback(producer.stop)
        inbound = await _tail(settings, requester, asks, stack)
        outbound = await _tail(settings, requester, answers, stack)
        tasks = [asyncio.create_task(_echo_loop(inbound, echoer, answers)),
                 asyncio.create_task(_reply_loop(outbound, waiting))]  # fmt: skip
        for task in tasks:
            stack.callback(task.cancel)
        first = time.monotonic()

        async def ask(n: int, scheduled: float) -> None:
            key = uuid.uuid4().bytes
            waiting[key] = asyncio.get_running_loop().create_future()
            try:
                await requester.send_and_wait(asks, ECHO_PAYLOAD, key=key, headers=[("id", key)])
                answered = await asyncio.wait_for(waiting[key], REQUEST_TIMEOUT)
            except (TimeoutError, OSError):
                figure.failures += 1
                return
            finally:
                waiting.pop(key, None)
            if scheduled - first >= WARMUP_SECONDS:
                figure.samples.append(answered - scheduled)

        figure.seconds = await _paced(plan.rate, plan.starts, ask)
    return figure


async def _create_topics(settings: Settings, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(n, settings.topic_partitions, 1) for n in names])
    finally:
        await admin.close()


async def _tail(
    settings: Settings, producer: AIOKafkaProducer, topic: str, stack: contextlib.AsyncExitStack
) -> AIOKafkaConsumer:
    """A consumer of every partition of ``topic``, from its end (as the SDK reads replies)."""
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    stack.push_async_callback(consumer.stop)
    partitions = await asyncio.wait_for(producer.partitions_for(topic), 30)
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    for partition in assigned:
        await consumer.position(partition)
    return consumer


async def _echo_loop(inbound: AIOKafkaConsumer, producer: AIOKafkaProducer, topic: str) -> None:
    """The tiny echo service: every request back as a reply with the same key and headers."""
    while True:
        for records in (await inbound.getmany(timeout_ms=500)).values():
            for record in records:
                await producer.send(
                    topic, record.value, key=record.key, headers=list(record.headers)
                )


async def _reply_loop(outbound: AIOKafkaConsumer, waiting: dict[bytes, Any]) -> None:
    while True:
        for records in (await outbound.getmany(timeout_ms=500)).values():
            now = time.monotonic()
            for record in records:
                future = waiting.get(record.key or b"")
                if future is not None and not future.done():
                    future.set_result(now)


# --- the table ------------------------------------------------------------------------------


def _ms(samples: Sequence[float], percentile: int) -> str:
    if len(samples) < 2:
        return "-"
    cut = statistics.quantiles(samples, n=100, method="inclusive")[percentile - 1]
    return f"{cut * 1000:.1f}"


def _table(figures: Sequence[Figure]) -> Table:
    table = Table(title="qm bench lease", title_justify="left")
    table.add_column("measure")
    for name in ("target /s", "achieved /s", "samples", "failed", "p50 ms", "p99 ms", "cycles /s"):
        table.add_column(name, justify="right")
    for f in figures:
        sends = f.sent - 1 if f.target_rate else f.sent  # paced: from the first send to the last
        achieved = sends / f.seconds if f.seconds else 0.0
        table.add_row(
            f.name,
            f"{f.target_rate:,.0f}" if f.target_rate else "max",
            f"{achieved:,.0f}",
            f"{len(f.samples):,}",
            f"{f.failures:,}",
            _ms(f.samples, 50),
            _ms(f.samples, 99),
            "" if f.cycles_per_second is None else f"{f.cycles_per_second:,.0f}",
        )
    return table
