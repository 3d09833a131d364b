"""The benchmarks' child processes and the CPU each process of a run used (from /proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from app.bench.services import read_text
from app.settings import Settings


class BenchFailed(RuntimeError):
    """The benchmark could not produce its figures; the message says why."""


class Child:
    """`python -m app run <process>` reading ``settings``; ``with`` stops it (SIGTERM)."""

    def __init__(self, settings: Settings, process: str, **overrides: object) -> None:
        self.process = process
        ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
        for name, value in {**settings.model_dump(), **overrides, "log_format": "json"}.items():
            if value is not None:
                plain = value.get_secret_value() if isinstance(value, SecretStr) else value
                env[f"QM_{name.upper()}"] = str(plain)
        self.log = Path(tempfile.mkstemp(prefix=f"qm-bench-{process}-", suffix=".log")[1])
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "run", process], env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise BenchFailed, with the end of its log, if the process has exited."""
        if (code := self.proc.poll()) is not None:
            raise BenchFailed(f"the {self.process} process exited with {code}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class CpuMeter:
    """CPU seconds of each process between ``begin`` and ``end``, read from /proc (Linux)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {"bench": os.getpid(), **pids}
        self.start: dict[str, float] = {}
        self.started = 0.0
        self.stop: tuple[dict[str, float], float] | None = None

    def sample(self) -> dict[str, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        out = {name: _cpu_of(pid, ticks) for name, pid in self.pids.items()}
        if postmaster := self.pids.get("postgres"):  # and its backends
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                if parent_of(pid) == postmaster:
                    out["postgres"] += _cpu_of(pid, ticks)
        fields = read_text("/proc/stat").split("\n", 1)[0].split()[1:]
        if len(fields) > 4:
            out["machine"] = (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / ticks
        return out

    def begin(self) -> None:
        self.start, self.started, self.stop = self.sample(), time.monotonic(), None

    def end(self) -> None:
        """Freeze the figures here (what follows, such as a run's clean-up, is not counted)."""
        self.stop = (self.sample(), time.monotonic())

    def used(self) -> tuple[dict[str, float], float]:
        """CPU seconds of each process since ``begin`` (to ``end`` if called), and the seconds."""
        now, at = self.stop or (self.sample(), time.monotonic())
        used = {k: v - self.start.get(k, 0.0) for k, v in now.items()}
        if "machine" in used:  # the machine's busy time, and what none of the above used
            ours = sum(v for k, v in used.items() if k != "machine")
            used["others"] = max(used["machine"] - ours, 0.0)
        return used, at - self.started

    def per_request(self, requests: int) -> dict[str, float]:
        """CPU milliseconds of each process per request since ``begin``."""
        used, _ = self.used()
        return {name: 1000 * cpu / max(requests, 1) for name, cpu in used.items()}

    def report(self, label: str, requests: int) -> str:
        """Each process's share of one core, and its CPU milliseconds per request."""
        used, elapsed = self.used()
        shares = ", ".join(
            f"{name} {100 * cpu / elapsed:.0f}% {1000 * cpu / max(requests, 1):.1f} ms"
            for name, cpu in used.items()
        )
        return f"CPU in {label}, {elapsed:.1f} s, {requests:,} requests: {shares}"


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    stat = read_text(f"/proc/{pid}/stat")
    return stat[stat.rfind(")") + 2 :].split()


def parent_of(pid: int) -> int:
    fields = proc_stat(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def _cpu_of(pid: int, ticks: int) -> float:
    """User plus system CPU seconds of a process."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / ticks if len(fields) > 12 else 0.0


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 if it is gone)."""
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
