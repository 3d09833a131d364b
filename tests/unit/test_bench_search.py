"""The lease bench's max-rate search, against a fake probe that sustains rates up to a limit."""

from __future__ import annotations

from app.bench import repeats
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


def test_the_summary_names_own_cpu_and_the_share_of_the_echo() -> None:
    figure = Figure("f", target_rate=100, samples=[0.01, 0.02], sent=3, seconds=1)
    report = Report(figure, figure, figure, echo_max_rate=4000, max_rate=1000)
    report.cpu_ms_per_request = {"worker": 1.0, "relay": 0.25, "postgres": 0.5, "kafka": 2.0,
                                 "bench": 3.0}  # fmt: skip
    report.own_cpu_ms_per_request_at_max = 1.5
    summary = report.summary()
    assert summary["own_cpu_ms_per_request"] == 1.75  # the broker and the bench are not ours
    assert summary["own_cpu_ms_per_request_at_max"] == 1.5
    assert summary["max_rate_of_echo"] == 0.25


def test_repeated_runs_give_medians_and_ranges_under_the_same_keys() -> None:
    runs = [
        {"rate": 100, "echo_max_rate": 3000, "max_rate": None, "cpu": {"worker": 1.0}},
        {"rate": 100, "echo_max_rate": 9000, "max_rate": 400, "cpu": {"worker": 3.0}},
        {"rate": 100, "echo_max_rate": 5000, "max_rate": 600, "cpu": {"worker": 2.0}},
    ]
    for run, failures in zip(runs, (0, 2, 0), strict=True):
        run["failures"] = failures
    merged = repeats.medians(runs)
    assert merged["echo_max_rate"] == 5000
    assert merged["max_rate"] == 500  # the runs that found one; the third is counted missing
    assert merged["missing"] == {"max_rate": 1}
    assert merged["failures"] == 2  # added up: one failing run shows
    assert merged["cpu"] == {"worker": 2.0}
    assert merged["ranges"]["echo_max_rate"] == [3000, 9000]
    assert merged["ranges"]["cpu"] == {"worker": [1.0, 3.0]}
    assert merged["runs"] == 3
    assert "echo_max_rate: 5000 (3000 to 9000)" in repeats.lines(merged)
    assert "max_rate: 500 (400 to 600, missing in 1 runs)" in repeats.lines(merged)
    assert "cpu.worker: 2 (1 to 3)" in repeats.lines(merged)


def test_the_captures_summary_compares_a_capture_with_a_request_of_the_cycle_run() -> None:
    from app.bench.captures import Result

    cycled = Figure("c", samples=[0.01, 0.02], sent=30, seconds=1, cycles_per_second=30.0)
    captured = Figure("k", samples=[0.1, 0.2], sent=50, seconds=1, cycles_per_second=50.0)
    result = Result(
        cycled, captured, [],
        {"worker": 2.0, "relay": 1.0, "handoff": 0.0, "postgres": 1.0, "kafka": 5.0},
        {"worker": 4.0, "relay": 2.0, "handoff": 3.0, "postgres": 3.0, "bench": 9.0},
    )  # fmt: skip
    summary = result.summary()
    assert summary["cpu_ms_per_start"] == 4.0  # the broker is not Quartermaster's
    assert summary["cpu_ms_per_capture"] == 12.0  # the handoff worker is; the bench is not
    assert summary["capture_to_start_cpu"] == 3.0
    assert summary["own_processes"] == ["handoff", "postgres", "relay", "worker"]
    assert (summary["captures_per_s"], summary["cycles_per_s"]) == (50.0, 30.0)
