"""Running `qm …` in tests as an operator would, against the test's database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
from click.testing import Result
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings, get_settings

Qm = Callable[..., Awaitable[Result]]


@pytest.fixture(name="qm")
def qm_fixture(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qm]:
    """``await qm("seeds", "list", …, input=…)``: the command's result (it runs on a thread, as
    it starts its own event loop)."""
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
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
