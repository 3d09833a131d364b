"""The Docker user's path without a container engine: one line saying so, from `qm dev
--containers` and from the test harness under ``QM_TEST_SERVICES=containers``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.devstack.containers import NO_ENGINE


def _no_engine_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No service named and an engine address where none answers (so on any machine)."""
    ours = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_") and k not in ours}
    return {**env, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", **extra}


def test_newcomer_qm_dev_containers_without_an_engine_says_so_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "dev", "--containers", "--fresh"], cwd=tmp_path,
        env=_no_engine_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == NO_ENGINE
    assert not (tmp_path / ".qm-dev").exists()  # nothing made before the engine was asked


def test_newcomer_the_harness_with_containers_and_no_engine_stops_with_one_line(
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_newcomer_cli.py"],
        cwd=root, env=_no_engine_env(tmp_path, QM_TEST_SERVICES="containers"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert output.count(NO_ENGINE) == 1, output
    assert "Traceback" not in output and "passed" not in output
