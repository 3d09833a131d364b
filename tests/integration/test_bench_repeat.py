"""`qm bench lease --repeat N --json` on the real broker and database: one JSON line a run, then
the medians of every figure with their ranges, Quartermaster's own CPU among them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from app.settings import Settings
from tests.support.processes import settings_env


async def test_bench_lease_repeat_prints_each_run_then_the_medians_with_ranges(
    settings: Settings, kafka_bootstrap: str, postgres_admin_url: str
) -> None:
    env = settings_env(settings)
    env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_bootstrap
    env["DATABASE_URL"] = postgres_admin_url  # the bench makes and drops its own database
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "bench", "lease", "--json", "--repeat", "2",
         "--rate", "20", "--duration", "2", "--seconds", "1", "--warmup", "0",
         "--search-steps", "1", "--search-seconds", "1", "--echo-search-steps", "1",
         "--sites", "2", "--collectors", "2", "--concurrency", "4"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3, done.stdout  # two runs, then the medians
    first, second, merged = lines
    assert merged["runs"] == 2
    for key in ("echo_p50_ms", "granted_p99_ms", "cycles_per_s", "echo_max_rate", "max_rate",
                "cpu_ms_per_request", "own_cpu_ms_per_request",
                "own_cpu_ms_per_request_at_max"):  # fmt: skip
        assert key in first and key in merged
    cycles = sorted([first["cycles_per_s"], second["cycles_per_s"]])
    assert merged["ranges"]["cycles_per_s"] == cycles
    assert merged["cycles_per_s"] == round(sum(cycles) / 2, 3)
    assert merged["own_cpu_ms_per_request"] > 0  # the claim worker and relay were measured
    assert merged["failures"] == 0
