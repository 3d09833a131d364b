"""`qm dev` as a newcomer meets it: `qm` at hand, suggestions that fit, one stack per folder,
health and metrics on loopback only. One `qm dev --demo` serves the whole module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dotenv import dotenv_values

from app.devstack.dev import BANNER_TITLE, ENV_FILE
from tests.support.http import get
from tests.support.waiting import eventually_sync

READY_SECONDS = 120.0
STOP_SECONDS = 60.0


def _env(cwd: Path) -> dict[str, str]:
    """The environment of a newcomer's shell: no QM_* setting, no service named, no java."""
    ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
    env["PATH"] = str(cwd / "empty-path")
    return env


@dataclass
class Stack:
    cwd: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def banner(self) -> str:
        text = self.log.read_text(errors="replace")
        return text[text.index(BANNER_TITLE) :] if BANNER_TITLE in text else ""

    def health(self) -> str:
        found = re.search(r"(http://[\d.]+:\d+)/readyz", self.banner())
        assert found is not None, self.banner()
        return found.group(1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cwd = tmp_path_factory.mktemp("newcomer")
    log = cwd / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "dev", "--demo"], cwd=cwd, env=_env(cwd), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Stack(cwd, proc, log)

    def ready() -> str:
        assert proc.poll() is None, log.read_text(errors="replace")  # it stopped: say why
        return running.banner()

    try:
        eventually_sync(ready, timeout=READY_SECONDS, every=0.2)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_SECONDS)


def test_newcomer_the_banner_puts_qm_at_hand_and_suggests_the_demo_site(stack: Stack) -> None:
    banner = stack.banner()
    shell = re.search(r"In another shell: `([^`]+)`", banner)
    assert shell is not None, banner
    assert "set -a; . ./.qm-dev.env; set +a" in shell.group(1)
    # the banner's one command, in a shell whose PATH has no `qm`, makes `qm` answer
    done = subprocess.run(
        ["bash", "-c", f"{shell.group(1)}; qm sites list"], cwd=stack.cwd,
        env={**_env(stack.cwd), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout
    tries = re.findall(r"^    (qm .*)$", banner, re.MULTILINE)
    assert tries == ["qm sites list", "qm accounts list demo", "qm jobs list --site demo"]


def _listening(port: int) -> set[str]:
    """The addresses (hex, as /proc/net/tcp writes them) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


async def test_newcomer_health_and_metrics_of_qm_dev_listen_on_loopback_only(
    stack: Stack,
) -> None:
    health = stack.health()
    assert health.startswith("http://127.0.0.1:")
    assert (await get(f"{health}/healthz"))[0] == 200
    assert _listening(int(health.rsplit(":", 1)[1])) == {"0100007F"}  # 127.0.0.1 alone


def test_newcomer_a_second_qm_dev_in_the_folder_names_the_first_and_exits_2(
    stack: Stack,
) -> None:
    env_file = stack.cwd / ENV_FILE
    written = env_file.read_text()
    bootstrap = dotenv_values(env_file)["QM_KAFKA_BOOTSTRAP_SERVERS"]
    second = subprocess.run(
        [sys.executable, "-m", "app", "dev", "--fresh"], cwd=stack.cwd, env=_env(stack.cwd),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2, second.stdout + second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert f"pid {stack.proc.pid}" in lines[0] and f"Kafka {bootstrap}" in lines[0]
    assert stack.health() in lines[0]
    assert env_file.read_text() == written  # the first stack's env file, untouched
    assert (stack.cwd / ".qm-dev" / "postgres").is_dir()  # --fresh deleted nothing
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(STOP_SECONDS) == 0
    assert not env_file.exists()  # its owner removed it on the way out
