"""The collector SDK installed alone (``pip install .``, no extras, in ``make sdk``'s virtual
environment): none of the server's dependencies come with it, and a collector run by that
environment's python takes a job with an account, heartbeats and finishes it against the real
Quartermaster processes (run from the project's environment), Kafka and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os

from app.settings import Settings
from tests.support.leasing import CANARY
from tests.support.processes import serving
from tests.support.sdk_alone import SCRIPTS, installed, run, sdk_venv, site_packages

SERVER_ONLY = {"sqlalchemy", "asyncpg", "faststream", "alembic", "typer"}


def test_the_client_install_pulls_none_of_the_server() -> None:
    venv = sdk_venv()
    packages = installed(venv)
    assert "quartermaster" in packages
    assert {"aiokafka", "pydantic", "cryptography"} <= packages
    assert packages & SERVER_ONLY == set()


def test_qm_without_the_server_says_in_one_line_what_to_install() -> None:
    venv = sdk_venv()
    result = run(venv, "-m", "app", "--help")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'quartermaster[server]'" in lines[0]


def test_a_collector_with_the_client_alone_runs_a_job_end_to_end(topics: Settings) -> None:
    venv = sdk_venv()
    with serving(topics, capacity=1, n_accounts=1):
        result = run(
            venv,
            str(SCRIPTS / "collector.py"),
            topics.kafka_bootstrap_servers,
            topics.topic_prefix,
            "board",
        )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    # the venv's own copy ran, not this checkout's
    assert got["sdk"].startswith(str(site_packages(venv)) + os.sep)
    assert got["server_modules_loaded"] == []
    assert got["username"] == "user0@board"
    assert got["secret_sha256"] == hashlib.sha256(f"{CANARY}-0".encode()).hexdigest()
    assert got["lease_token"] >= 1
    assert got["extended"] is True
    assert got["status"] == "SUCCEEDED"
