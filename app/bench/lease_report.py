"""What `qm bench lease` prints: the table and its notes, or (``--json``) one JSON object that a
later run can be compared with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.table import Table

from app.bench.lease_runs import Figure, percentile_ms


@dataclass(slots=True)
class Report:
    """Everything one run measured."""

    echo: Figure
    granted: Figure
    cycles: Figure
    cpu_lines: list[str] = field(default_factory=list)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # the cycle run's
    wal_bytes_per_request: dict[str, float] = field(default_factory=dict)
    worker_rss_mb: float = 0.0
    echo_max_rate: float | None = None
    max_rate: float | None = None
    own_cpu_ms_per_request_at_max: float | None = None  # at the highest sustained start rate
    search: list[str] = field(default_factory=list)
    history: int = 0

    def summary(self) -> dict[str, object]:
        """The JSON object of ``--json``."""
        return {
            "echo_p50_ms": _round(percentile_ms(self.echo.samples, 50)),
            "echo_p99_ms": _round(percentile_ms(self.echo.samples, 99)),
            "granted_p50_ms": _round(percentile_ms(self.granted.samples, 50)),
            "granted_p99_ms": _round(percentile_ms(self.granted.samples, 99)),
            "rate": self.granted.target_rate,
            "cycles_per_s": _round(self.cycles.cycles_per_second),
            "echo_max_rate": self.echo_max_rate,
            "max_rate": self.max_rate,
            "cpu_ms_per_request": {k: round(v, 3) for k, v in self.cpu_ms_per_request.items()},
            "own_cpu_ms_per_request": _round(own_cpu(self.cpu_ms_per_request)),
            "own_cpu_ms_per_request_at_max": _round(self.own_cpu_ms_per_request_at_max),
            "own_processes": sorted(
                name
                for name in self.cpu_ms_per_request
                if name.startswith("worker") or name in ("relay", "postgres")
            ),
            "max_rate_of_echo": (
                round(self.max_rate / self.echo_max_rate, 3)
                if self.max_rate and self.echo_max_rate
                else None
            ),
            "wal_bytes_per_request": {k: round(v) for k, v in self.wal_bytes_per_request.items()},
            "worker_rss_mb": round(self.worker_rss_mb, 1),
            "history": self.history,
            "failures": self.echo.failures + self.granted.failures + self.cycles.failures,
        }

    def notes(self) -> list[str]:
        """The lines printed under the table."""
        lines = [f.note for f in (self.echo, self.granted, self.cycles) if f.note]
        lines += self.cpu_lines
        wal = ", ".join(f"{k} {v:,.0f} B" for k, v in self.wal_bytes_per_request.items())
        lines.append(f"WAL per request: {wal}; claim worker RSS {self.worker_rss_mb:.0f} MB")
        if self.search:
            lines.append("max rate search (p99 < 250 ms, no failures): " + "; ".join(self.search))
        return lines


def own_cpu(per_process: dict[str, float]) -> float:
    """Quartermaster's own CPU per request: its claim workers, its relay and PostgreSQL (when
    started by the bench; a server the environment names is not measured)."""
    return sum(
        ms for name, ms in per_process.items()
        if name.startswith("worker") or name in ("relay", "postgres")
    )  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def ms(samples: Sequence[float], percentile: int) -> str:
    value = percentile_ms(samples, percentile)
    return "-" if value is None else f"{value:.1f}"


def table(figures: Sequence[Figure]) -> Table:
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
            ms(f.samples, 50),
            ms(f.samples, 99),
            "" if f.cycles_per_second is None else f"{f.cycles_per_second:,.0f}",
        )
    return table
