"""`qm top` against the real database and broker: what one refresh shows, and the live command
driven in a pseudo-terminal (quits on `q` and on Ctrl-C)."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import select
import signal
import sys
import time
from datetime import datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer
from rich.console import Console
from sqlalchemy.ext.asyncio import AsyncEngine

from app.commands.top import (
    DeadLetters,
    count_dead_letters,
    read_snapshot,
    render,
    watch_dead_letters,
)
from app.kafka import producer_options
from app.settings import Settings
from app.store import Database
from reapers.expired_leases import ExpiredLeases
from tests.support.leasing import make_site, scalar, start
from tests.support.waiting import eventually
from workers.requests import RequestProcessor

DEADLINE_SECONDS = 30.0


def cells(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in text.splitlines():
        parts = [part.strip() for part in line.strip("│┃ ").split("│")]
        if parts and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r} in:\n{text}")


def rendered(view: object, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(view)
    return console.export_text()


async def busy_site(settings: Settings, engine: AsyncEngine) -> None:
    """board: capacity 1, one lease reaped (its slot went to the waiter), one job waiting."""
    await make_site(engine, settings, lease_seconds=60)
    processor = RequestProcessor(settings, Database(engine))
    await processor.process(start(settings, "dead"))
    await processor.process(start(settings, "waiter"))
    now = await scalar(engine, "SELECT now()")
    assert isinstance(now, datetime)
    reaped = await ExpiredLeases(settings, Database(engine)).run_once(
        now=now + timedelta(seconds=61)
    )
    assert reaped.changed == ["dead"]
    await processor.process(start(settings, "patient"))


async def dead_letter(settings: Settings, count: int) -> None:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        for n in range(count):
            await producer.send_and_wait(settings.topic("requests.dlt"), f'{{"n": {n}}}'.encode())
    finally:
        await producer.stop()


async def test_one_refresh_shows_sites_outbox_dead_letters_and_repairs(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    await busy_site(settings, engine)
    await dead_letter(settings, 2)
    outbox_rows = await scalar(engine, "SELECT count(*) FROM outbox")

    snapshot = await read_snapshot(Database(engine))
    text = rendered(render(snapshot, DeadLetters(await count_dead_letters(settings), None)))

    site = cells(text, "board")
    assert site[1:3] == ["1/1", "1"]  # running of capacity, waiting
    assert site[3].endswith("s")  # the oldest waiter's age
    assert site[4:10] == ["0", "0", "1", "0", "0", "2"]  # ready .. inactive, grants/min
    assert cells(text, str(outbox_rows))[0] == str(outbox_rows)
    assert cells(text, settings.topic("requests.dlt"))[1] == "2"
    assert cells(text, settings.topic("captures.dlt"))[1] == "0"
    assert cells(text, "1")[:3] == ["1", "0", "0"]  # leases expired, waits timed out, exhausted


async def test_a_broker_that_does_not_answer_is_shown_and_the_view_goes_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    unreachable = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:9"})
    seen = DeadLetters()
    watcher = asyncio.create_task(watch_dead_letters(unreachable, seen, 0.2))
    try:
        await eventually(
            lambda: asyncio.sleep(0, result=seen.error and "cannot be reached" in seen.error),
            timeout=DEADLINE_SECONDS,
        )
    finally:
        watcher.cancel()
    text = rendered(render(await read_snapshot(Database(engine)), seen))
    assert "127.0.0.1:9" in text and "(no sites" in text


def drive(settings: Settings, keys: bytes) -> tuple[int, str]:
    """Run `qm top` in a pseudo-terminal until its view shows the site, press ``keys``, and
    return its exit status and everything it wrote."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
        },
        "QM_DATABASE_URL": settings.database_url,
        "QM_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "QM_TOPIC_PREFIX": settings.topic_prefix,
        "COLUMNS": "150",
        "LINES": "60",
        "TERM": "xterm",
    }
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as controlling terminal
        os.execve(sys.executable, [sys.executable, "-m", "app", "top", "--interval", "0.3"], env)
    output = b""
    pressed = False
    done, status = 0, 0
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    output += os.read(fd, 65536)
                except OSError:  # the child closed the terminal: it exits
                    break
            if not pressed and b"board" in output and b"requests.dlt" in output:
                os.write(fd, keys)
                pressed = True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            raise AssertionError(f"qm top did not quit (keys sent: {pressed}): {output[-2000:]!r}")
        if not done:
            _, status = os.waitpid(pid, 0)
        assert pressed, f"qm top quit before it was asked to: {output[-2000:]!r}"
        return os.waitstatus_to_exitcode(status), output.decode(errors="replace")
    finally:
        with_child_gone(pid)
        os.close(fd)


def with_child_gone(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.mark.parametrize(("keys", "what"), [(b"q", "q"), (b"\x03", "Ctrl-C")])
async def test_the_live_view_in_a_terminal_quits_cleanly(
    topics: Settings, engine: AsyncEngine, keys: bytes, what: str
) -> None:
    await busy_site(topics, engine)

    code, output = await asyncio.to_thread(drive, topics, keys)

    assert code == 0, f"{what}: {output[-2000:]}"
    assert "Traceback" not in output
    assert "qm top" in output and "1/1" in output
