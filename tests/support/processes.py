"""Quartermaster's real processes for tests: `python -m app run …` with the test's settings."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import create_async_engine

from app.settings import Settings
from tests.support.leasing import make_site


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The environment that makes a child process read ``settings`` (plus overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env.pop("DATABASE_URL", None)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    values = {**settings.model_dump(), **overrides}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"QM_{name.upper()}"] = str(value)
    env["QM_LOG_FORMAT"] = "json"
    return env


class QmProcess:
    """`qm run <process>` as a child process; ``with`` stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, settings: Settings, process: str = "all", **overrides: object) -> None:
        self.env = settings_env(settings, **overrides)
        self.args = [sys.executable, "-m", "app", "run", process]
        self.log = Path(tempfile.mkstemp(prefix=f"qm-{process}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QmProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def kill(self) -> None:
        """SIGKILL: the process dies wherever it is, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __enter__(self) -> QmProcess:
        return self.start()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)


@contextmanager
def serving(settings: Settings, *, capacity: int, n_accounts: int) -> Iterator[None]:
    """Site "board" with ``n_accounts`` accounts, and every qm process running on ``settings``
    until the block ends; fails if the processes died before then."""
    asyncio.run(_make_site(settings, capacity, n_accounts))
    with QmProcess(settings, "all") as process:
        yield
        assert process.proc is not None and process.proc.poll() is None, "the worker stopped"


async def _make_site(settings: Settings, capacity: int, n_accounts: int) -> None:
    engine = create_async_engine(settings.database_url)
    try:
        await make_site(engine, settings, capacity=capacity, n_accounts=n_accounts)
    finally:
        await engine.dispose()
