"""Running `qm …` in tests as an operator would, against the test's database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import pytest
from click.testing import Result
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings, get_settings
from tests.support.processes import settings_env

Qm = Callable[..., Awaitable[Result]]


@pytest.fixture(name="qm")
def qm_fixture(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qm]:
    """``await qm("seeds", "list", …, input=…)``: the command's result (it runs on a thread, as
    it starts its own event loop)."""
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QM_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("QM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    monkeypatch.setenv("COLUMNS", "250")  # wide tables: nothing wraps
    runner = CliRunner()

    async def invoke(*args: str, input: str | None = None) -> Result:
        get_settings.cache_clear()
        return await asyncio.to_thread(runner.invoke, app, list(args), input=input)

    yield invoke
    get_settings.cache_clear()


def assert_one_red_line(result: Result, *words: str) -> None:
    """An operator mistake: exit 2 and one line on stderr naming ``words``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@contextmanager
def operator_cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """A runner for `qm …` as an operator runs it: every one of the test's settings in the
    environment, and nothing of the machine's own."""
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    # the process-wide logging setup (cached loggers) would outlive this test
    monkeypatch.setattr("app.cli.configure_logging", lambda *args: None)
    get_settings.cache_clear()
    try:
        yield CliRunner()
    finally:
        get_settings.cache_clear()
