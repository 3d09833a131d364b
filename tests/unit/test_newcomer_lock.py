"""One `qm dev` per folder: the lock names its holder, and a holder that dies, however it dies,
leaves the folder free for the next stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.devstack.lock import DevStackBusy, FolderLock, holder_line
from app.devstack.postgres import forget_dead_handles

HOLD = (
    "import sys; from pathlib import Path; from app.devstack.lock import FolderLock; "
    "lock = FolderLock(Path(sys.argv[1])).acquire(); lock.describe(Kafka='127.0.0.1:9'); "
    "print('held', flush=True); sys.stdin.read()"
)


def test_newcomer_a_dead_holder_frees_the_folder_and_a_live_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / ".qm-dev.lock"
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(DevStackBusy) as busy:
                FolderLock(path).acquire()
            assert f"(pid {holder.pid}, Kafka 127.0.0.1:9)" in str(busy.value)
        finally:
            holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
            holder.wait(30)
    with FolderLock(path):  # the kernel dropped the dead holder's lock
        assert path.exists()


def test_newcomer_services_a_killed_stack_left_are_stopped_by_the_next(tmp_path: Path) -> None:
    """`qm dev` killed with SIGKILL leaves its broker and database running; the next `qm dev`
    in the folder stops what the dead holder's lock file names, if it still runs as a service."""
    tansu = tmp_path / "tansu-server"  # named like the dev broker
    shutil.copy(shutil.which("sleep") or "/bin/sleep", tansu)
    orphan = subprocess.Popen([str(tansu), "300"])
    bystander = subprocess.Popen(["sleep", "300"])  # a reused pid: not a service, left alone
    path = tmp_path / ".qm-dev.lock"
    try:
        holder = FolderLock(path).acquire()
        holder.describe([orphan.pid, bystander.pid], Kafka="127.0.0.1:9")
        assert "service_pids" not in holder_line(path.read_text())  # the busy line names no pids
        os.close(holder.fd or -1)  # the holder dies without releasing (its file still names them)
        with FolderLock(path):
            assert orphan.wait(15) is not None
        assert bystander.poll() is None
    finally:
        for process in (orphan, bystander):
            process.kill()
            process.wait(10)


def test_newcomer_a_killed_user_of_the_kept_database_is_forgotten(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait(10)
    (tmp_path / ".handle_pids.json").write_text(json.dumps([dead.pid, os.getpid()]))
    forget_dead_handles(tmp_path)
    assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [os.getpid()]
