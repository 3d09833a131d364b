"""The project's own services: `qm dev` on embedded services from start to Ctrl-C, and the one clear
message a missing tool gets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from dotenv import dotenv_values

from app.bench.processes import parent_of, proc_stat
from app.devstack import ServiceUnavailable
from app.devstack.dev import BANNER_TITLE
from app.devstack.kafka import KafkaBroker, ensure_jars
from app.kafka import sdk_client
from app.settings import Settings
from app.store import Database
from app.store.sites import site_load
from tests.support.http import get
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


class Dev:
    """`qm dev` running in ``cwd`` as a child process, its output in a file."""

    def __init__(self, cwd: Path, proc: asyncio.subprocess.Process, output: Path) -> None:
        self.cwd, self.proc, self.output = cwd, proc, output

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def settings(self) -> Settings:
        """Settings from the env file it wrote (as a newcomer would source it); the SDK's
        idempotent producer is left on: the SDK finds out that Tansu has none."""
        values = dotenv_values(self.cwd / ".qm-dev.env")
        return Settings(
            database_url=values["QM_DATABASE_URL"],
            kafka_bootstrap_servers=values["QM_KAFKA_BOOTSTRAP_SERVERS"],
            secret_keys=values["QM_SECRET_KEYS"],
            sealing_keys=values["QM_SEALING_KEYS"],
        )

    async def ctrl_c(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return await asyncio.wait_for(self.proc.wait(), 60)


@asynccontextmanager
async def qm_dev(cwd: Path, *args: str) -> AsyncIterator[Dev]:
    """Start `qm dev` with no Java and no Maven on the PATH; yield once its banner is printed."""
    ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")  # qm dev starts its own services
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
    env["PATH"] = str(cwd / "empty-path")  # nothing there: no java, no mvn
    output = cwd / f"dev-{uuid.uuid4().hex[:8]}.log"
    with output.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "dev", *args, cwd=cwd, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    dev = Dev(cwd, proc, output)

    async def ready() -> bool:
        assert proc.returncode is None, dev.text()
        return BANNER_TITLE in dev.text()

    try:
        await eventually(ready, timeout=DEV_READY_SECONDS, every=0.2)
        yield dev
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_make_dev_does_not_fetch_the_kafka_jars() -> None:
    plan = subprocess.run(
        ["make", "-n", "dev"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "qm dev" in plan
    assert "ensure_jars" not in plan and "mvn" not in plan


async def test_qm_dev_serves_a_job_on_embedded_services_and_ctrl_c_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    async with qm_dev(tmp_path) as dev:
        banner = dev.text()[dev.text().index(BANNER_TITLE) :]
        health = re.search(r"(http://127\.0\.0\.1:\d+)/readyz", banner)
        assert health is not None, banner
        assert (await get(f"{health.group(1)}/readyz"))[0] == 200
        assert "set -a; . ./.qm-dev.env; set +a" in banner
        console = re.search(
            r"Console     (http://127\.0\.0\.1:\d+)/ \(sign in with the token", banner
        )
        assert console is not None, banner  # the web console, with a token only its owner reads
        assert (await get(f"{console.group(1)}/login"))[0] == 200
        assert (tmp_path / ".qm-dev" / "console-token").stat().st_mode & 0o077 == 0
        assert len(re.findall(r"^    qm ", banner, re.MULTILINE)) == 3  # three commands to try
        assert (tmp_path / ".qm-dev.env").stat().st_mode & 0o077 == 0
        settings = dev.settings()
        db = Database.from_settings(settings)
        await make_site(db.engine, settings)
        await db.close()
        async with (
            sdk_client(settings, request_timeout=30) as client,
            client.job(site="board", lease_seconds=60, wait_seconds=30) as job,
        ):
            assert job.account is not None and job.account.username == "user0@board"
        children = _descendants(dev.proc.pid)
        assert children, "qm dev runs PostgreSQL and the broker as child processes"
        assert await dev.ctrl_c() == 0
    assert not [pid for pid in children if _alive(pid)]
    assert not (tmp_path / ".qm-dev.env").exists()
    assert "\x1b[" not in dev.text()  # no colour codes in a log file


async def demo_job_account(dev: Dev) -> str:
    async with (
        sdk_client(dev.settings(), request_timeout=30) as client,
        client.job(site="demo", lease_seconds=60, wait_seconds=30) as job,
    ):
        assert job.account is not None
        assert job.account.secret.get_secret_value()  # sealed with the kept key, opened again
        return job.account.username


async def sites_of(dev: Dev) -> list[str]:
    db = Database.from_settings(dev.settings())
    try:
        async with db.transaction() as conn:
            return [str(row["slug"]) for row in await site_load(conn)]
    finally:
        await db.close()


async def test_qm_dev_keeps_its_state_between_runs_and_fresh_starts_over(tmp_path: Path) -> None:
    async with qm_dev(tmp_path, "--demo") as dev:
        assert "qm accounts list demo" in dev.text()
        assert (await demo_job_account(dev)).endswith("@demo.example.com")
        assert await dev.ctrl_c() == 0
    async with qm_dev(tmp_path) as dev:  # the second run: same database, same keys
        assert await sites_of(dev) == ["demo"]
        assert (await demo_job_account(dev)).endswith("@demo.example.com")
        assert await dev.ctrl_c() == 0
    async with qm_dev(tmp_path, "--fresh") as dev:
        assert await sites_of(dev) == []
        assert await dev.ctrl_c() == 0
