"""Settings as a newcomer pastes them: a URL of another PostgreSQL driver is read as ours, and a
bad ``QM_*`` value is one line naming the variable, for every command and every `qm run`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.settings import Settings

PYTHON = [sys.executable, "-m", "app"]


@pytest.mark.parametrize(
    ("pasted", "read"),
    [
        ("postgresql://qm:pw@db:5432/qm", "postgresql+asyncpg://qm:pw@db:5432/qm"),
        ("postgres://qm:pw@db/qm", "postgresql+asyncpg://qm:pw@db/qm"),
        ("postgresql+psycopg2://qm@db/qm", "postgresql+asyncpg://qm@db/qm"),
        ("postgresql+psycopg://qm@/qm?host=/run/pg", "postgresql+asyncpg://qm@/qm?host=/run/pg"),
        (
            "postgresql://qm@db/qm?sslmode=require&application_name=qm",
            "postgresql+asyncpg://qm@db/qm?ssl=require&application_name=qm",
        ),
        ("postgresql+asyncpg://qm@db/qm", "postgresql+asyncpg://qm@db/qm"),
    ],
)
def test_newcomer_database_urls_of_another_driver_are_read_with_asyncpg(
    pasted: str, read: str
) -> None:
    assert Settings(database_url=pasted).database_url == read


def _qm(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
    return subprocess.run(
        [*PYTHON, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("command", "variable", "value", "named"),
    [
        (("sites", "list"), "QM_METRICS_PORT", "abc", "QM_METRICS_PORT is not valid: input should be a valid integer"),
        (("run", "worker"), "QM_LOG_FORMAT", "xml", "QM_LOG_FORMAT is not valid: input should be 'console' or 'json'"),
        (("top", "--once"), "QM_DATABASE_URL", "mysql://qm:hunter2@db/qm", "QM_DATABASE_URL takes a PostgreSQL URL"),
        (("jobs", "list"), "QM_KAFKA_SECURITY_PROTOCOL", "TLS", "QM_KAFKA_SECURITY_PROTOCOL is not valid"),
        (("accounts", "list"), "DATABASE_URL", "mysql://qm:hunter2@db/qm", "DATABASE_URL takes a PostgreSQL URL"),
    ],
)  # fmt: skip
def test_newcomer_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(
    command: tuple[str, ...], variable: str, value: str, named: str
) -> None:
    done = _qm(*command, **{variable: value})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(named), lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr + done.stdout  # a value may be a secret: never echoed


def test_newcomer_the_metrics_address_is_a_setting_every_interface_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QM_METRICS_HOST", raising=False)
    assert Settings().metrics_host == "0.0.0.0"  # production's probes and scraper reach it
    monkeypatch.setenv("QM_METRICS_HOST", "127.0.0.1")
    assert Settings().metrics_host == "127.0.0.1"
