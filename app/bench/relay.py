"""`qm bench relay`: the outbox relay next to a plain producer sending the same messages.

Two figures, both against a real broker and a durable PostgreSQL (fsync and synchronous commit on):

- throughput: N messages sent by a plain idempotent producer (acks=all) from memory, versus the same
  N rows committed to the outbox in one transaction and drained by one relay running its real loop
  (``--pipeline-depth`` rounds in flight), from the commit until the outbox is empty;
- latency at a moderate, steady rate: a plain producer's send to ack, versus the relay's commit to
  ack (a writer commits one row per transaction; the relay runs its real loop, woken by NOTIFY).

Each relay run prints the CPU the relay used per row (it runs in this process; from /proc) and,
with the bench's own PostgreSQL, the server's. The latency run also samples, once a second, the
outbox's dead rows and the relay's read (``EXPLAIN (ANALYZE, BUFFERS)``): deleted rows must not
slow it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from app.bench.processes import CpuMeter
from app.bench.relay_costs import describe_samples, sample_outbox
from app.bench.services import bench_names, services
from app.db.engine import make_engine
from app.kafka import ensure_topics, producer_options
from app.outbox.relay import Relay
from app.outbox.writer import MESSAGE_ID, Outbox, enqueue
from app.settings import Settings
from app.store.outbox import UnsentRow, backlog
from app.store.outbox_stats import ReadCost, TableStats

WARMUP_SECONDS = 0.5  # latency samples of the first half second are left out


@dataclass(frozen=True, slots=True)
class Message:
    key: bytes
    payload: bytes


def bench_relay(
    messages: Annotated[int, typer.Option(help="Messages of the throughput run.")] = 20_000,
    size: Annotated[int, typer.Option(help="Payload bytes per message.")] = 256,
    keys: Annotated[int, typer.Option(help="Distinct keys.")] = 200,
    rate: Annotated[float, typer.Option(help="Messages per second of the latency run.")] = 500.0,
    duration: Annotated[float, typer.Option(help="Seconds of the latency run.")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="Relay rows per shard per round.")] = 500,
    pipeline_depth: Annotated[
        int, typer.Option(help="Relay rounds in flight (1: one round at a time).")
    ] = Settings.model_fields["outbox_pipeline_depth"].default,
) -> None:
    """Relay throughput and commit-to-ack latency next to a plain producer's."""
    with services() as found:
        bootstrap, database_url = found.bootstrap, found.database_url
        settings = Settings(
            database_url=database_url,
            kafka_bootstrap_servers=bootstrap,
            **bench_names(),
            outbox_batch_size=batch_size,
            outbox_pipeline_depth=pipeline_depth,
        )
        print(
            f"relay bench: {messages} messages of {size} B over {keys} keys; "
            f"{settings.outbox_shards} shards, {batch_size} rows per shard per round, "
            f"{pipeline_depth} round(s) in flight; "
            f"Kafka {bootstrap}, durable PostgreSQL"
        )
        postgres = {"postgres": found.pids["postgres"]} if "postgres" in found.pids else {}
        asyncio.run(_bench(settings, messages, size, keys, rate, duration, postgres))


async def _bench(
    settings: Settings,
    messages: int,
    size: int,
    keys: int,
    rate: float,
    duration: float,
    postgres: dict[str, int],
) -> None:
    await ensure_topics(settings)
    topic = settings.topic("events")
    batch = [
        Message(f"key-{n % keys}".encode(), os.urandom(size // 2).hex().encode().ljust(size, b"."))
        for n in range(messages)
    ]
    engine = make_engine(settings, pool_size=8)
    try:
        plain = await _plain_throughput(settings, topic, batch)
        meter = CpuMeter(postgres)
        relayed = await _relay_throughput(settings, engine, topic, batch, meter)
        print(
            f"throughput  plain producer {plain:>9,.0f} msg/s   relay {relayed:>9,.0f} rows/s"
            f"   relay/plain {relayed / plain:.0%}"
        )
        print(f"  {_cpu_per_row(meter, len(batch))}")
        plain_lat = await _plain_latency(settings, topic, batch, rate, duration)
        meter = CpuMeter(postgres)
        samples: list[tuple[TableStats, ReadCost]] = []
        sampling = asyncio.create_task(sample_outbox(settings, engine, samples))
        try:
            relay_lat = await _relay_latency(settings, engine, topic, batch, rate, duration, meter)
        finally:
            sampling.cancel()
        print(
            f"latency at {rate:,.0f} msg/s for {duration:.0f} s"
            f"\n  plain producer send->ack:                {_percentiles(plain_lat)}"
        )
        print(f"  relay commit->ack, from the COMMIT call:   {_percentiles(relay_lat.from_call)}")
        print(f"  relay commit->ack, from COMMIT's return:   {_percentiles(relay_lat.from_return)}")
        print(f"  the writer's COMMIT call itself (fsync):   {_percentiles(relay_lat.commit)}")
        print(f"  {_cpu_per_row(meter, relay_lat.rows)}")
        print(f"  {describe_samples(samples)}")
    finally:
        await engine.dispose()


async def _producer(settings: Settings) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    return producer


def _headers() -> list[tuple[str, bytes]]:
    return [(MESSAGE_ID, str(uuid.uuid4()).encode())]


async def _plain_throughput(settings: Settings, topic: str, batch: Sequence[Message]) -> float:
    """Messages per second of a plain producer sending ``batch`` from memory (after a warm-up)."""
    producer = await _producer(settings)
    try:
        elapsed = 0.0
        for timed in (False, True):  # the first pass warms up the broker and the client
            headers = [_headers() for _ in batch]
            start = time.perf_counter()
            futures = [
                await producer.send(topic, m.payload, key=m.key, headers=h)
                for m, h in zip(batch, headers, strict=True)
            ]
            await asyncio.gather(*futures)
            elapsed = time.perf_counter() - start if timed else 0.0
        return len(batch) / elapsed
    finally:
        await producer.stop()


async def _relay_throughput(
    settings: Settings,
    engine: AsyncEngine,
    topic: str,
    batch: Sequence[Message],
    meter: CpuMeter,
) -> float:
    """Rows per second of a relay running its loop over ``batch``, committed beforehand, from
    the loop's start until the outbox is empty again."""
    acked = [0]
    all_acked = asyncio.Event()

    async def count(rows: Sequence[UnsentRow]) -> None:
        acked[0] += len(rows)
        if acked[0] >= len(batch):
            all_acked.set()

    relay, stop = Relay(settings), asyncio.Event()
    await _write(engine, settings, topic, [Message(b"warm-up", b"warm-up")])
    await relay.run_once()  # connects, takes every shard, starts its producer
    await _write(engine, settings, topic, batch)
    relay.after_ack = count
    meter.begin()
    start = time.perf_counter()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.wait_for(all_acked.wait(), 120)
        await _drained(engine)
        elapsed = time.perf_counter() - start
        meter.end()
    finally:
        stop.set()
        await running
    return len(batch) / elapsed


async def _drained(engine: AsyncEngine) -> None:
    """Return once the outbox holds no row (the relay deletes right after the acks)."""
    deadline = time.monotonic() + 30
    async with engine.connect() as conn:
        while (await backlog(conn)).rows:
            assert time.monotonic() < deadline, "the outbox did not drain within 30 s"
            await conn.rollback()  # a new snapshot for the next look
            await asyncio.sleep(0.002)  # pacing the look, the relay deletes meanwhile


def _cpu_per_row(meter: CpuMeter, rows: int) -> str:
    used, elapsed = meter.used()
    parts = [
        f"{'relay' if name == 'bench' else name} {1000 * cpu / max(rows, 1):.3f} ms"
        for name, cpu in used.items()
        if name in ("bench", "postgres")
    ]
    return f"CPU per row ({rows:,} rows, {elapsed:.1f} s): " + ", ".join(parts)


async def _write(
    engine: AsyncEngine, settings: Settings, topic: str, batch: Sequence[Message]
) -> None:
    """Commit ``batch`` to the outbox, 1,000 rows per transaction."""
    for start in range(0, len(batch), 1000):
        box = Outbox(settings.outbox_shards)
        for m in batch[start : start + 1000]:
            box.add(topic, m.key, m.payload)
        async with engine.begin() as conn:
            await box.flush(conn)


async def _paced(rate: float, duration: float, send: Any) -> None:
    """Call ``send(n)`` as a task at a steady ``rate`` for ``duration`` seconds; await them all."""
    start = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for n in range(int(rate * duration)):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load, not waiting for a condition
        tasks.append(asyncio.create_task(send(n)))
    await asyncio.gather(*tasks)


async def _plain_latency(
    settings: Settings, topic: str, batch: Sequence[Message], rate: float, duration: float
) -> list[float]:
    producer = await _producer(settings)
    samples: list[float] = []
    warm_until = time.monotonic() + WARMUP_SECONDS

    async def send(n: int) -> None:
        m = batch[n % len(batch)]
        sent = time.monotonic()
        await (await producer.send(topic, m.payload, key=m.key, headers=_headers()))
        if sent > warm_until:
            samples.append(time.monotonic() - sent)

    try:
        await _paced(rate, duration, send)
    finally:
        await producer.stop()
    return samples


@dataclass(frozen=True, slots=True)
class RelayLatency:
    """The commit happens somewhere inside the COMMIT call: both ends of it bound commit->ack."""

    from_call: list[float]  # from the writer's COMMIT call to the broker's ack (upper bound)
    from_return: list[float]  # from the COMMIT call's return to the broker's ack (lower bound)
    commit: list[float]  # the COMMIT call itself (its WAL flush), for reference
    rows: int = 0  # rows the writer committed, warm-up included


@dataclass(frozen=True, slots=True)
class WriterPlan:
    """What the writer process commits: one row per transaction at a steady rate."""

    database_url: str
    shards: int
    topic: str
    rate: float
    duration: float
    batch: tuple[Message, ...]


def _writer_process(plan: WriterPlan, results: Connection) -> None:
    """The latency run's writer, in its own process as in production; sends back commit times."""
    results.send(asyncio.run(_write_paced(plan)))
    results.close()


async def _write_paced(plan: WriterPlan) -> dict[bytes, tuple[float, float]]:
    """Commit the plan's rows; per message id, when its COMMIT was called and when it returned."""
    settings = Settings(database_url=plan.database_url, outbox_shards=plan.shards)
    engine = make_engine(settings, pool_size=8)
    committed: dict[bytes, tuple[float, float]] = {}

    async def write(n: int) -> None:
        m = plan.batch[n % len(plan.batch)]
        async with engine.connect() as conn:
            tx = await conn.begin()
            message_id = await enqueue(conn, plan.topic, m.key, m.payload, shards=plan.shards)
            called = time.monotonic()
            await tx.commit()
            committed[message_id.encode()] = (called, time.monotonic())

    try:
        await _paced(plan.rate, plan.duration, write)
    finally:
        await engine.dispose()
    return committed


async def _relay_latency(
    settings: Settings,
    engine: AsyncEngine,
    topic: str,
    batch: Sequence[Message],
    rate: float,
    duration: float,
    meter: CpuMeter,
) -> RelayLatency:
    """Commit-to-ack of a relay running its real loop while another process commits rows."""
    acked: dict[bytes, float] = {}
    expected = [1]  # the warm-up row; then every row the writer committed
    all_acked = asyncio.Event()

    async def on_ack(rows: Sequence[UnsentRow]) -> None:
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        if meter.stop is None and not meter.start and len(acked) >= expected[0]:
            meter.begin()  # the writer's first row: metered from here (not its start-up)
        for row in rows:
            acked[dict(row.headers)[MESSAGE_ID] or b""] = now
        if len(acked) >= expected[0]:
            all_acked.set()

    stop = asyncio.Event()
    relay_task = asyncio.create_task(Relay(settings, after_ack=on_ack).run(stop))
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    plan = WriterPlan(settings.database_url, settings.outbox_shards, topic, rate, duration,
                      tuple(batch))  # fmt: skip
    writer = spawn.Process(target=_writer_process, args=(plan, sender))
    try:
        await _write(engine, settings, topic, [Message(b"warm-up", b"warm-up")])
        await asyncio.wait_for(all_acked.wait(), 30)
        all_acked.clear()
        writer.start()
        committed = await asyncio.to_thread(_results, receiver, writer)
        await asyncio.to_thread(writer.join, 30)
        expected[0] = len(committed) + 1
        if len(acked) < expected[0]:
            await asyncio.wait_for(all_acked.wait(), 30)
        meter.end()
    finally:
        stop.set()
        await relay_task
        if writer.is_alive():
            writer.kill()
    warm = min(called for called, _ in committed.values()) + WARMUP_SECONDS
    timed = [(acked[m], called, done) for m, (called, done) in committed.items() if called > warm]
    return RelayLatency(
        from_call=[ack - called for ack, called, _ in timed],
        from_return=[ack - done for ack, _, done in timed],
        commit=[done - called for _, called, done in timed],
        rows=len(committed),
    )


def _results(receiver: Connection, writer: Any) -> dict[bytes, tuple[float, float]]:
    """What the writer process sends back; an error if it ends without sending it."""
    for _ in range(100_000):  # bounded: each look waits up to a second
        if receiver.poll(1.0):
            results: dict[bytes, tuple[float, float]] = receiver.recv()
            return results
        if not writer.is_alive():
            raise RuntimeError(f"the writer process ended with {writer.exitcode}, no results")
    raise RuntimeError("the writer process sent no results")


def _percentiles(samples: Sequence[float]) -> str:
    if len(samples) < 2:
        return "n/a (too few samples)"
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:.1f} ms  p99 {cuts[98] * 1000:.1f} ms  (n={len(samples)})"
