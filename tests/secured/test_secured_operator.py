"""Operators over the secured transport: `qm` commands and `qm bench` connect as the service does;
the benchmarks' topics and groups are named under the service's, so its ACLs cover them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from app.settings import Settings
from tests.secured.conftest import SecuredStack
from tests.support.processes import settings_env


async def test_secured_relay_benchmark_runs_as_the_service(
    settings: Settings, secured_stack: SecuredStack
) -> None:
    env = settings_env(settings)
    env["KAFKA_BOOTSTRAP_SERVERS"] = secured_stack.broker.bootstrap
    env["DATABASE_URL"] = secured_stack.postgres.url()  # TCP: TLS only
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "bench", "relay", "--messages", "200", "--size", "64",
         "--keys", "10", "--rate", "40", "--duration", "1"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "relay commit->ack" in output
    assert f"{settings.topic_prefix}bench" in output  # under the service's prefix
    for password in secured_stack.security.users.values():
        assert password not in output


async def test_secured_operator_commands_reach_broker_and_database_and_print_no_password(
    settings: Settings, secured_stack: SecuredStack
) -> None:
    outputs = []
    for command in (["topics"], ["top", "--once"], ["sites", "list"], ["outbox", "ls"]):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "app", *command], env=settings_env(settings),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stdout + done.stderr)
        outputs.append(done.stdout + done.stderr)
    assert "created 9 topics" in outputs[0]
    for password in secured_stack.security.users.values():
        assert password not in "".join(outputs)
