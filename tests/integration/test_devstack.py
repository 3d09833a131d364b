"""The project's own services: `qm dev` on embedded services from start to Ctrl-C, and the one clear
message a missing tool gets."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from app.bench.processes import parent_of, proc_stat
from app.devstack import ServiceUnavailable
from app.devstack.kafka import KafkaBroker, ensure_jars
from app.sdk import QuartermasterClient
from app.settings import Settings
from app.store import Database
from tests.support.leasing import make_site
from tests.support.waiting import eventually

DEV_READY_SECONDS = 120.0


def test_a_broker_without_java_fails_with_one_message_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which there is no java
    with pytest.raises(ServiceUnavailable, match=r"Kafka cannot start: `java` is not installed"):
        KafkaBroker().start()


def test_no_jar_cache_and_no_maven_fails_with_one_message_naming_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("QM_KAFKA_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ServiceUnavailable, match=r"`mvn` is not installed"):
        ensure_jars()


def test_the_cli_says_what_is_missing_in_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "PATH")}
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "relay", "--messages", "10"],
        env={**env, "PATH": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "Kafka cannot start: `java` is not installed (the broker runs on Java 17)."
    )
    assert "Traceback" not in done.stdout + done.stderr


def _descendants(pid: int) -> set[int]:
    """Every living process below ``pid``."""
    parents = {int(p): parent_of(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return bool(fields) and fields[0] != "Z"


async def test_qm_dev_serves_a_job_on_embedded_services_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")  # qm dev starts its own services
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
    output = tmp_path / "dev.log"
    with output.open("wb") as log:
        dev = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "dev", cwd=tmp_path, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def ready() -> bool:
        assert dev.returncode is None, output.read_text()
        return b"claim_worker_started" in output.read_bytes()

    try:
        await eventually(ready, timeout=DEV_READY_SECONDS, every=0.2)
        env_file = dotenv_values(tmp_path / ".qm-dev.env")
        assert (tmp_path / ".qm-dev.env").stat().st_mode & 0o077 == 0
        settings = Settings(
            database_url=env_file["QM_DATABASE_URL"],
            kafka_bootstrap_servers=env_file["QM_KAFKA_BOOTSTRAP_SERVERS"],
            kafka_idempotence=False,
            secret_keys=env_file["QM_SECRET_KEYS"],
            sealing_keys=env_file["QM_SEALING_KEYS"],
        )
        db = Database.from_settings(settings)
        await make_site(db.engine, settings)
        await db.close()
        async with (
            QuartermasterClient.from_settings(settings, request_timeout=30) as client,
            client.job(site="board", lease_seconds=60, wait_seconds=30) as job,
        ):
            assert job.account is not None and job.account.username == "user0@board"
        children = _descendants(dev.pid)
        assert children, "qm dev runs PostgreSQL and the broker as child processes"
        dev.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.wait_for(dev.wait(), 60) == 0
        assert not [pid for pid in children if _alive(pid)]
        assert not (tmp_path / ".qm-dev.env").exists()
    finally:
        if dev.returncode is None:
            dev.kill()
            await dev.wait()
