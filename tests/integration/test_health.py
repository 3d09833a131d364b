"""Every process's health endpoint: /metrics, /healthz and /readyz, measured from the start."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from app.devstack import free_port
from app.root import PROCESSES
from app.settings import Settings
from tests.support.http import get, get_json
from tests.support.leasing import make_site
from tests.support.processes import QmProcess
from tests.support.waiting import eventually


def gauge(metrics: bytes, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None if it is not there."""
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def test_a_worker_is_alive_ready_and_measured_once_its_consumer_has_partitions(
    topics: Settings,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with QmProcess(topics, "worker", metrics_port=port) as worker:

        async def ready() -> object:
            assert worker.proc is not None and worker.proc.poll() is None, worker.output()
            status, body = await get_json(f"{base}/readyz")
            return body if status == 200 else None

        body = await eventually(ready, timeout=60)
        assert body == {
            "ready": True,
            "processes": {"worker": {"database": True, "broker": True, "consumer_assigned": True}},
            "transport": {  # what protects the connections (the secured suite: over SASL_SSL)
                "kafka": {"security_protocol": "PLAINTEXT", "sasl_mechanism": None},
                "database": {"tls": False},
                "warnings": [],
            },
        }
        assert await get_json(f"{base}/healthz") == (200, {"alive": True})
        status, metrics = await get(f"{base}/metrics")
        assert status == 200
        assert gauge(metrics, "qm_ready", process="worker") == 1.0
        assert gauge(metrics, "qm_ready_check", process="worker", check="consumer_assigned") == 1.0
        assert (await get(f"{base}/nothing-here"))[0] == 404


async def test_readiness_names_an_unreachable_database_from_the_start_while_liveness_holds(
    topics: Settings,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    nowhere = f"postgresql+asyncpg://qm:qm@127.0.0.1:{free_port()}/qm"
    with QmProcess(topics, "all", metrics_port=port, database_url=nowhere) as server:

        async def answers() -> object:
            assert server.proc is not None and server.proc.poll() is None, server.output()
            status, body = await get_json(f"{base}/readyz")
            return (status, body) if status else None

        status, body = await eventually(answers, timeout=60)
        assert status == 503 and body["ready"] is False
        checks = body["processes"]
        assert set(checks) == set(PROCESSES)  # every process of `qm run all` reports
        databases = {name: c["database"] for name, c in checks.items() if "database" in c}
        assert databases == dict.fromkeys(checks.keys() - {"auditor"}, False)  # it reads Kafka only
        assert body["processes"]["relay"]["broker"] is True
        assert await get_json(f"{base}/healthz") == (200, {"alive": True})

        async def measured_not_ready() -> bool:
            metrics = (await get(f"{base}/metrics"))[1]
            return gauge(metrics, "qm_ready", process="relay") == 0.0

        await eventually(measured_not_ready, timeout=30)


async def test_the_reaper_publishes_each_sites_running_waiting_and_accounts_by_status(
    settings: Settings, engine: AsyncEngine
) -> None:
    await make_site(engine, settings, "board", capacity=2, n_accounts=3)
    await make_site(engine, settings, "forum", capacity=1, n_accounts=1)
    port = free_port()
    with QmProcess(settings, "reaper", metrics_port=port) as reaper:

        async def site_gauges() -> bytes | None:
            assert reaper.proc is not None and reaper.proc.poll() is None, reaper.output()
            status, metrics = await get(f"http://127.0.0.1:{port}/metrics")
            found = gauge(metrics, "qm_site_accounts", site="forum", status="ACTIVE")
            return metrics if status == 200 and found is not None else None

        metrics = await eventually(site_gauges, timeout=60)
    assert gauge(metrics, "qm_site_accounts", site="board", status="ACTIVE") == 3.0
    assert gauge(metrics, "qm_site_accounts", site="board", status="BLOCKED") == 0.0
    assert gauge(metrics, "qm_site_running", site="board") == 0.0
    assert gauge(metrics, "qm_site_waiting", site="forum") == 0.0
