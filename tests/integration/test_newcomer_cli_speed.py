"""`qm` answers fast because a command imports only what it uses: a database command neither the
benchmarks nor the processes, `qm run relay` only the relay (a relay restarted after a crash
serves within a second). The module checks are the guard. The costs are CPU time (which, unlike
time on the clock, barely grows while others share the 2-core machine), best of three, against
that of importing the libraries such a command needs at all, measured alongside (the machine's
speed itself varies twofold): with head-room over what docs/performance.md measured ("The CLI"),
and under what the code before cost (about 2.5 times it, for either)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from app.devstack import free_port
from app.settings import Settings
from tests.support.http import get
from tests.support.processes import QmProcess, settings_env
from tests.support.waiting import eventually

# what `qm sites list` used to import and needs none of
NOT_FOR_A_LIST = ("app.bench", "app.root", "app.core", "faststream", "aiokafka", "slack_sdk")
# what `qm run relay` used to import: the other processes' libraries and the SDK's client (its
# broker probe, app.sdk.connection_check, the relay uses at start)
NOT_FOR_THE_RELAY = (
    "app.bench",
    "app.sdk.client",
    "app.sdk.job",
    "faststream",
    "slack_sdk",
    "aiohttp",
    "workers.claim",
)
# what a command that reads the database, or a relay, cannot do without
NEEDED = (
    "import sqlalchemy.ext.asyncio, asyncpg, aiokafka, pydantic_settings, structlog, typer, rich"
)
DUMP_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('MODULES', *sorted(sys.modules), file=sys.stderr))\n"
    "sys.argv = ['qm', *sys.argv[1:]]\n"
    "from app.qm import main\n"
    "main()\n"
)


def imported(modules: str, packages: tuple[str, ...]) -> set[str]:
    names = modules.split()
    return {p for p in packages for m in names if m == p or m.startswith(f"{p}.")}


def cpu_seconds_best_of_three(args: list[str], env: dict[str, str]) -> float:
    """The CPU time (user + system) of the command's process, at best of three runs: unlike the
    time on the clock, it barely grows when other work shares the machine."""

    def once() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(args, env=env, capture_output=True, check=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    return min(once() for _ in range(3))


@pytest.fixture(scope="module")
def floor() -> float:
    """The CPU time of importing what a command needs at all, on this machine as it is now."""
    return cpu_seconds_best_of_three([sys.executable, "-c", NEEDED], dict(os.environ))


def test_newcomer_a_database_command_imports_neither_the_bench_nor_the_processes(
    settings: Settings, floor: float
) -> None:
    env = settings_env(settings)
    done = subprocess.run(
        [sys.executable, "-c", DUMP_MODULES, "sites", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    modules = done.stderr.rpartition("MODULES ")[2]
    assert "sqlalchemy" in modules.split()  # it did ask the database
    assert imported(modules, NOT_FOR_A_LIST) == set()
    took = cpu_seconds_best_of_three([sys.executable, "-m", "app", "sites", "list"], env)
    assert took < 1.6 * floor, f"qm sites list took {took:.2f} s of CPU, its libraries {floor:.2f}"


def test_newcomer_qm_run_relay_imports_only_the_relay() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, app.cli, app.root\n"
            "app.root.process('relay')\n"
            "print(*sorted(sys.modules))\n",
        ],
        env=os.environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "workers.relay" in done.stdout.split()
    assert imported(done.stdout, NOT_FOR_THE_RELAY) == set()


async def test_newcomer_a_relay_started_by_qm_run_serves_after_little_work(
    topics: Settings, floor: float
) -> None:
    async def serving() -> float:
        """The CPU time the relay spent from its start until its /readyz said 200."""
        port = free_port()
        with QmProcess(topics, "relay", metrics_port=port) as relay:
            assert relay.proc is not None

            async def ready() -> bool:
                assert relay.proc is not None and relay.proc.poll() is None, relay.output()
                return (await get(f"http://127.0.0.1:{port}/readyz"))[0] == 200

            await eventually(ready, timeout=30, every=0.02)
            return cpu_seconds_of(relay.proc.pid)

    best = min([await serving() for _ in range(3)])
    assert best < 2.0 * floor, (
        f"qm run relay served after {best:.2f} s of CPU, its libraries {floor:.2f}"
    )


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of a running process so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
