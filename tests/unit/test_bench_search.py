"""The lease bench's max-rate search, against a fake probe that sustains rates up to a limit."""

from __future__ import annotations

from app.bench.lease_report import Report
from app.bench.lease_runs import Figure, search_max_rate


def probe_up_to(limit: float, tried: list[float]):  # type: ignore[no-untyped-def]
    async def probe(rate: float) -> Figure:
        tried.append(rate)
        samples = [0.01] * 50 if rate <= limit else [0.5] * 50  # 10 ms, or 500 ms over it
        return Figure("probe", target_rate=rate, samples=samples, sent=51, seconds=50 / rate)

    return probe


async def test_the_search_doubles_then_bisects_to_the_highest_sustained_rate() -> None:
    tried: list[float] = []
    best, log = await search_max_rate(probe_up_to(300, tried), start=100, ceiling=1600, steps=6)
    assert tried == [100, 200, 400, 300, 350, 325]
    assert best == 300
    assert log[2] == "400/s no"


async def test_the_search_stops_at_the_ceiling_and_at_its_step_bound() -> None:
    tried: list[float] = []
    best, _ = await search_max_rate(probe_up_to(10_000, tried), start=100, ceiling=400, steps=9)
    assert (best, tried) == (400, [100, 200, 400])
    tried.clear()
    best, _ = await search_max_rate(probe_up_to(0, tried), start=100, ceiling=400, steps=2)
    assert (best, tried) == (None, [100, 50])


def test_the_json_summary_has_every_comparable_figure() -> None:
    figure = Figure("f", target_rate=100, samples=[0.01, 0.02], sent=3, seconds=1)
    summary = Report(figure, figure, figure).summary()
    for key in ("echo_p50_ms", "echo_p99_ms", "granted_p50_ms", "granted_p99_ms", "rate",
                "cycles_per_s", "echo_max_rate", "max_rate", "cpu_ms_per_request",
                "worker_rss_mb", "wal_bytes_per_request"):  # fmt: skip
        assert key in summary
