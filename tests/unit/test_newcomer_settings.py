"""Settings as a newcomer pastes them: a URL of another PostgreSQL driver is read as ours, and a
bad ``QM_*`` value is one line naming the variable, for every command and every `qm run`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import asyncpg
import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import make_url

from app.commands.failures import explain
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
            "postgresql://qm@db/qm?sslmode=require&target_session_attrs=read-write",
            "postgresql+asyncpg://qm@db/qm?ssl=require&target_session_attrs=read-write",
        ),
        ("postgresql+asyncpg://qm@db/qm", "postgresql+asyncpg://qm@db/qm"),
    ],
)
def test_newcomer_database_urls_of_another_driver_are_read_with_asyncpg(
    pasted: str, read: str
) -> None:
    url = Settings(database_url=pasted).database_url
    assert url == read
    # and asyncpg takes every parameter the driver will pass it
    arguments = PGDialect_asyncpg().create_connect_args(make_url(url))[1]
    assert set(arguments) <= set(inspect.signature(asyncpg.connect).parameters)


@pytest.mark.parametrize(
    "pasted",
    [
        "postgresql://qm@db/qm?sslmode=require&application_name=qm",  # libpq's, not asyncpg's
        "postgresql://qm@db/qm?connect_timeout=5",
        "postgresql://qm@db/qm?ssl=require&sslmode=require",
    ],
)
def test_newcomer_database_url_parameters_asyncpg_would_refuse_are_refused_at_once(
    pasted: str,
) -> None:
    """Not at the first connection, in every process, as a traceback."""
    with pytest.raises(ValidationError, match="query parameter"):
        Settings(database_url=pasted)


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


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("QM_SECRET_KEYS", "not-a-fernet-key", "QM_SECRET_KEYS is not a Fernet key"),
        ("QM_SEALING_KEYS", "@@@", "QM_SEALING_KEYS is not standard base64"),
    ],
)
def test_newcomer_a_malformed_key_stops_a_process_in_one_line(
    variable: str, value: str, words: str
) -> None:
    keys = {"QM_SECRET_KEYS": Fernet.generate_key().decode(), "QM_SEALING_KEYS": ""}
    done = _qm("run", "worker", **{**keys, variable: value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == next(
        line for line in done.stderr.splitlines() if words in line
    )
    assert "Traceback" not in done.stderr and value not in done.stderr


def test_newcomer_a_missing_server_library_is_the_install_line() -> None:
    line = explain(ModuleNotFoundError("No module named 'sqlalchemy'", name="sqlalchemy"))
    assert (
        line
        == "qm runs Quartermaster's server: pip install 'quartermaster[server]' (missing: sqlalchemy)"
    )
    assert explain(ModuleNotFoundError("No module named 'app.nothing'", name="app.nothing")) is None


def test_newcomer_a_password_with_a_raw_at_sign_is_refused_without_showing_it() -> None:
    done = _qm("sites", "list", QM_DATABASE_URL="postgresql://qm:hun@ter2@127.0.0.1:1/db")
    assert done.returncode == 2
    assert "%40" in done.stderr and "ter2" not in done.stderr and "Traceback" not in done.stderr


def test_newcomer_help_answers_even_with_a_bad_setting() -> None:
    done = _qm("sites", "--help", QM_METRICS_PORT="abc")
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_newcomer_a_reply_partition_that_is_no_integer_is_an_sdk_error() -> None:
    from app.sdk import InvalidArgument, QuartermasterClient

    with pytest.raises(InvalidArgument, match="reply_partition"):
        QuartermasterClient("127.0.0.1:9092", reply_partition="3")  # type: ignore[arg-type]
