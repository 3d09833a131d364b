"""One `qm dev` per folder: the lock names its holder, and a holder that dies, however it dies,
leaves the folder free for the next stack."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.devstack.lock import DevStackBusy, FolderLock

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
