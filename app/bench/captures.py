"""`qm bench captures`: the second stage end to end, next to the job cycle of `qm bench lease`.

One run against real services (started here unless ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL``
name them) with the real claim worker, outbox relay and handoff worker as child processes. It
prints, in the same run:

- job cycles (start, then finish) per second at max throughput through the SDK, ``--concurrency``
  loops back to back: the reference the capture stage is measured against;
- captures through the whole stage: ``--concurrency`` loops, each holding one job and submitting
  captures back to back (``job.submit_capture``, which waits for ``capture.accepted``), while a
  consumer of ``qm.captures.ready`` notes when each capture arrives there. Latency is submit ->
  ``capture.ready``; captures/s is the captures that reached ``qm.captures.ready`` over the time
  from the first submit to the last arrival. Sites have no webhook: the downstream is the
  ``qm.captures.ready`` topic itself.

``--history N`` preloads what ``qm bench lease --history N`` does (``app.bench.history.preload``):
N finished jobs with their grants, inbox rows and delivered captures, and settled seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from app.bench import history, lease_report, repeats
from app.bench.echo import tail
from app.bench.lease import Plan, bench_settings
from app.bench.lease_report import ms
from app.bench.lease_runs import (
    LEASE_SECONDS,
    REQUEST_TIMEOUT,
    WARMUP_SECONDS,
    Figure,
    cycles,
    percentile_ms,
    warm_up,
)
from app.bench.processes import BenchFailed, Child, CpuMeter
from app.bench.services import run_database
from app.bench.services import services as start_services
from app.kafka import ensure_topics, producer_options, sdk_client
from app.logs import configure_logging
from app.sdk import QuartermasterClient
from app.sdk.job import Job
from app.settings import Settings

Opt = typer.Option
console = Console(width=max(Console().width, 120))  # the table is wider than a pipe's 80
err = Console(stderr=True)
DRAIN_SECONDS = 60.0  # how long the run waits for the last captures to reach the ready topic


def bench_captures(
    concurrency: Annotated[int, Opt(help="Loops of each run, back to back.")] = 32,
    seconds: Annotated[float, Opt(help="Seconds of each run.")] = 10.0,
    collectors: Annotated[int, Opt(help="SDK clients (collectors) sharing the load.")] = 4,
    n_sites: Annotated[int, Opt("--sites", help="Sites the jobs are spread over.")] = 8,
    warmup: Annotated[float, Opt(help="Seconds of unmeasured cycles before the runs.")] = 10.0,
    history_jobs: Annotated[int, Opt("--history", help=history.HISTORY_HELP)] = 0,
    repeat: Annotated[
        int, Opt(help="Runs, back to back; prints each figure's median and range.")
    ] = 1,
    as_json: Annotated[
        bool, Opt("--json", help="Print one JSON object a run, not the table.")
    ] = False,
) -> None:
    """submit -> capture.ready latency and captures/s, next to job cycles/s of the same run."""
    configure_logging("console", "WARNING")
    plan = Plan(rate=1.0, duration=1.0, collectors=max(collectors, 1),
                concurrency=max(concurrency, 1), cycles=10_000_000, seconds=seconds,
                sites=max(n_sites, 1), consumers=None, warmup=warmup,
                history=max(history_jobs, 0))  # fmt: skip
    out = err if as_json else console
    summaries: list[dict[str, Any]] = []
    try:
        with start_services() as services:
            out.print(
                f"captures bench: Kafka {services.bootstrap}; PostgreSQL {services.durability}; "
                f"{os.cpu_count()} CPUs; {plan.collectors} collectors; {plan.concurrency} loops; "
                "claim worker, relay and handoff worker as child processes"
            )
            for run in range(max(repeat, 1)):
                # each run its own database, topics, groups and child processes
                with run_database(services, run) as database_url:
                    settings = bench_settings(services.bootstrap, database_url)
                    slugs = [f"site{n}" for n in range(plan.sites)]
                    result = asyncio.run(_bench(settings, plan, slugs, services.pids, out))
                summaries.append(result.summary())
                if as_json:
                    print(json.dumps(summaries[-1]), flush=True)
                else:
                    _print(result)
    except BenchFailed as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if len(summaries) > 1:
        merged = repeats.medians(summaries)
        if as_json:  # the last line: the medians, with their ranges
            print(json.dumps(merged))
            return
        console.print(f"medians of {len(summaries)} runs (lowest to highest):")
        for line in repeats.lines(merged):
            console.print(f"  {line}")


@dataclass(slots=True)
class Result:
    """One run: the cycle and capture figures, each run's CPU line and CPU per process."""

    cycles: Figure
    captures: Figure
    cpu_lines: list[str]
    cycle_cpu: dict[str, float]  # ms per cycle, by process
    capture_cpu: dict[str, float]  # ms per capture, by process
    history: int = 0  # finished jobs preloaded (--history)

    def summary(self) -> dict[str, Any]:
        """The JSON object of ``--json``. ``cpu_ms_per_start`` is the cycle run's CPU per
        request (a start, a heartbeat or a finish; also ``cpu_ms_per_request``), the figure a
        capture's is compared with; ``own_processes`` names the processes counted (PostgreSQL
        only when the bench started it)."""
        per_start, per_capture = own_cpu(self.cycle_cpu), own_cpu(self.capture_cpu)
        return {
            "captures_per_s": round(self.captures.cycles_per_second or 0.0, 2),
            "cycles_per_s": round(self.cycles.cycles_per_second or 0.0, 2),
            "cpu_ms_per_capture": round(per_capture, 3),
            "cpu_ms_per_start": round(per_start, 3),
            "cpu_ms_per_request": round(per_start, 3),
            "own_processes": sorted(
                name for name in self.capture_cpu if name in OWN or name.startswith("worker")
            ),
            "capture_to_start_cpu": round(per_capture / per_start, 3) if per_start else None,
            "capture_p50_ms": _ms(self.captures.samples, 50),
            "capture_p99_ms": _ms(self.captures.samples, 99),
            "cpu_ms_per_capture_by_process": {k: round(v, 3) for k, v in self.capture_cpu.items()},
            "cpu_ms_per_request_by_process": {k: round(v, 3) for k, v in self.cycle_cpu.items()},
            "history": self.history,
            "failures": self.cycles.failures + self.captures.failures,
        }


OWN = frozenset({"worker", "relay", "handoff", "postgres"})


def own_cpu(per_process: dict[str, float]) -> float:
    """Quartermaster's own CPU: claim worker, relay, handoff worker and PostgreSQL (when started
    by the bench)."""
    return lease_report.own_cpu(per_process) + per_process.get("handoff", 0.0)


def _ms(samples: Sequence[float], percentile: int) -> float | None:
    value = percentile_ms(samples, percentile)
    return None if value is None else round(value, 2)


def _print(result: Result) -> None:
    console.print(_table([result.cycles, result.captures]))
    if result.cycles.cycles_per_second and result.captures.cycles_per_second:
        share = result.captures.cycles_per_second / result.cycles.cycles_per_second
        console.print(f"captures/s are {share:.0%} of job cycles/s in this run")
    for line in result.cpu_lines:
        console.print(line)


async def _cycles(
    clients: Sequence[QuartermasterClient], slugs: Sequence[str], plan: Plan
) -> Figure:
    return await cycles(
        clients, slugs, concurrency=plan.concurrency, count=plan.cycles, seconds=plan.seconds
    )


async def _bench(
    settings: Settings, plan: Plan, slugs: list[str], pids: dict[str, int], out: Console
) -> Result:
    await ensure_topics(settings)
    await history.make_sites(
        settings, slugs, accounts_per_site=plan.accounts_per_site, lease_seconds=LEASE_SECONDS
    )
    loaded = await history.preload(settings, slugs, plan.history)  # analyzes even without
    if plan.history:
        out.print(loaded.line())
    with contextlib.ExitStack() as processes:
        children = {name: processes.enter_context(Child(settings, name))
                    for name in ("worker", "relay", "handoff")}  # fmt: skip
        meter = CpuMeter({**{name: c.proc.pid for name, c in children.items()}, **pids})
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    sdk_client(settings, request_timeout=REQUEST_TIMEOUT)
                )
                for _ in range(plan.collectors)
            ]
            await warm_up(clients, slugs, list(children.values()))
            await _cycles(clients, slugs, replace(plan, seconds=plan.warmup))
            await history.restat(settings)  # statistics of tables with rows, as a server's
            meter.begin()
            cycled = await _cycles(clients, slugs, plan)
            meter.end()
            lines = [meter.report("the cycle run", cycled.requests)]
            cycle_cpu = meter.per_request(cycled.requests)  # a start, a heartbeat or a finish
            meter.begin()
            captured = await _captures(settings, clients, slugs, plan, meter)
            lines.append(meter.report("the capture run", captured.sent))  # one request each
            capture_cpu = meter.per_request(captured.sent)
            for child in children.values():
                child.check()
            return Result(cycled, captured, lines, cycle_cpu, capture_cpu, plan.history)


async def _captures(
    settings: Settings,
    clients: Sequence[QuartermasterClient],
    slugs: Sequence[str],
    plan: Plan,
    meter: CpuMeter,
) -> Figure:
    """Captures submitted back to back on ``plan.concurrency`` loops; each one's arrival on
    ``qm.captures.ready`` timed by a consumer of that topic."""
    figure = Figure(f"capture submit → capture.ready x{plan.concurrency}, SDK")
    submitted: dict[str, float] = {}
    arrived: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        producer = AIOKafkaProducer(**producer_options(settings))
        await producer.start()
        stack.push_async_callback(producer.stop)
        ready = await tail(settings, producer, settings.topic("captures.ready"), stack)
        reader = asyncio.create_task(_arrivals(ready, arrived))
        stack.callback(reader.cancel)
        jobs = [clients[k % len(clients)].job(site=slugs[k % len(slugs)],
                                              lease_seconds=LEASE_SECONDS, wait_seconds=30)
                for k in range(plan.concurrency)]  # fmt: skip
        for job in jobs:
            await stack.enter_async_context(job)
        begin = time.monotonic()
        deadline = begin + plan.seconds
        await asyncio.gather(*(_submit_loop(job, deadline, submitted, figure) for job in jobs))
        drain_until = time.monotonic() + DRAIN_SECONDS
        while len(arrived.keys() & submitted.keys()) < len(submitted):
            if time.monotonic() > drain_until:
                break
            await asyncio.sleep(0.05)  # polling the reader's tally, bounded by the drain time
        meter.end()
    done = [cid for cid in submitted if cid in arrived]
    figure.sent = len(done)
    figure.failures += len(submitted) - len(done)  # never reached the ready topic in time
    figure.samples = [
        arrived[c] - submitted[c] for c in done if submitted[c] - begin >= WARMUP_SECONDS
    ]
    last = max((arrived[c] for c in done), default=begin)
    figure.seconds = last - begin
    figure.cycles_per_second = len(done) / figure.seconds if figure.seconds else 0.0
    return figure


async def _submit_loop(
    job: Job, deadline: float, submitted: dict[str, float], figure: Figure
) -> None:
    while time.monotonic() < deadline:
        capture_id = uuid.uuid4().hex
        started = time.monotonic()
        submitted[capture_id] = started
        try:
            await job.submit_capture(
                capture_id=capture_id,
                url=f"https://{job.site}.example.com/items/{capture_id}",
                storage_uri=f"s3://bench/{capture_id}.html",
                sha256=hashlib.sha256(capture_id.encode()).hexdigest(),
                content_type="text/html",
                size=1024,
            )
        except Exception:  # noqa: BLE001 - counted as a failure; the run goes on
            del submitted[capture_id]
            figure.failures += 1


async def _arrivals(consumer: AIOKafkaConsumer, arrived: dict[str, float]) -> None:
    """Note when each capture reaches ``qm.captures.ready`` (the first time only)."""
    while True:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            now = time.monotonic()
            for record in records:
                capture_id = json.loads(record.value or b"{}").get("capture_id")
                if capture_id is not None:
                    arrived.setdefault(capture_id, now)


def _table(figures: Sequence[Figure]) -> Table:
    table = Table(title="qm bench captures", title_justify="left")
    table.add_column("measure")
    for name in ("done", "failed", "seconds", "p50 ms", "p99 ms", "per second"):
        table.add_column(name, justify="right")
    for f in figures:
        table.add_row(
            f.name,
            f"{f.sent:,}",
            f"{f.failures:,}",
            f"{f.seconds:.1f}",
            ms(f.samples, 50),
            ms(f.samples, 99),
            f"{f.cycles_per_second or 0:,.1f}",
        )
    return table
