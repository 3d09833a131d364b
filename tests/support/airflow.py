"""A real Apache Airflow for tests, run from its own virtual environment (``make airflow``).

Nothing of Airflow is imported here: tests drive the Airflow environment's python and ``airflow``
command as subprocesses (the scripts in ``tests/support/in_airflow/``), with ``PYTHONPATH`` at the
repository root so Airflow can import ``app.airflow``, as an Airflow image that installs it would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from app.devstack import free_port
from tests.support.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "infra" / "airflow" / "dags"
SCRIPTS = Path(__file__).resolve().parent / "in_airflow"


def airflow_venv() -> Path:
    """The Airflow virtual environment; the test fails (never skips) when it is missing."""
    venv = Path(os.environ.get("QM_AIRFLOW_VENV") or ROOT / ".venv-airflow")
    if not (venv / "bin" / "airflow").exists():
        pytest.fail(f"Airflow is not installed in {venv}: run `make airflow` (make test does)")
    return venv


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of an Airflow process with its own home and SQLite metadata database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "QM_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        PYTHONPATH=str(ROOT),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def kafka_connection(bootstrap: str, group: str) -> str:
    """An Airflow connection (``AIRFLOW_CONN_<ID>`` value) to the broker with its own consumer group."""
    extra = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }
    return json.dumps({"conn_type": "kafka", "extra": extra})


def run_in_airflow(
    script: str, *args: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run one of ``tests/support/in_airflow``'s scripts with Airflow's python."""
    python = airflow_venv() / "bin" / "python"
    return subprocess.run(
        [str(python), str(SCRIPTS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class TriggerRun:
    """The provider's real trigger running in Airflow's python until it fired ``fires`` times."""

    def __init__(self, home: Path, bootstrap: str, **spec: Any) -> None:
        spec.setdefault("kafka_config_id", "qm_kafka")
        group = f"airflow-{secrets.token_hex(6)}"
        self.env = airflow_env(
            home,
            **{
                f"AIRFLOW_CONN_{spec['kafka_config_id'].upper()}": kafka_connection(
                    bootstrap, group
                )
            },
        )
        self.args = [
            str(airflow_venv() / "bin" / "python"),
            str(SCRIPTS / "run_trigger.py"),
            json.dumps(spec),
        ]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> TriggerRun:
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def events(self, timeout: float) -> list[Any]:
        """Wait for the run to end; the payloads it printed (fails with its stderr otherwise)."""
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert self.proc.returncode == 0, (
            f"trigger run failed ({self.proc.returncode}): {lines} {err[-3000:]}"
        )
        return [line["event"] for line in lines]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


class DagTests:
    """``airflow dags test`` runs of the example DAGs in one Airflow home: a whole DAG run in one
    process, deferred tasks included (their triggers run in it), on a SQLite metadata database."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = airflow_env(home, **env)
        done = subprocess.run(
            [str(airflow_venv() / "bin" / "airflow"), "db", "migrate"],
            env=self.env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def start(self, dag_id: str, conf: dict[str, Any], **env: str) -> subprocess.Popen[str]:
        """Start one run of ``dag_id`` with ``conf`` (and ``env``); it ends when the run ends."""
        return subprocess.Popen(
            [str(airflow_venv() / "bin" / "airflow"), "dags", "test", dag_id, "--conf",
             json.dumps(conf)],
            env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    @staticmethod
    def finish(run: subprocess.Popen[str], timeout: float) -> None:
        output, _ = run.communicate(timeout=timeout)
        assert run.returncode == 0, output[-4000:]

    def run_with(self, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
        """The run of ``dag_id`` whose conf was ``conf``: its state, task states and returns."""
        with contextlib.closing(sqlite3.connect(self.home / "airflow.db")) as db:
            runs = db.execute(
                "SELECT run_id, state, conf FROM dag_run WHERE dag_id = ?", (dag_id,)
            ).fetchall()
            [(run_id, state)] = [(r, s) for r, s, c in runs if json.loads(c) == conf]
            tasks = db.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (dag_id, run_id),
            ).fetchall()
            returns = db.execute(
                "SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ?"
                " AND key = 'return_value'",
                (dag_id, run_id),
            ).fetchall()
        return {
            "state": state,
            "tasks": dict(tasks),
            "returns": {task: json.loads(value) for task, value in returns},
        }


class ApiServer:
    """``airflow api-server`` on loopback with its own home, SQLite metadata database and the
    example DAGs; the simple auth manager with one admin user whose password is fresh."""

    username = "quartermaster"

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="qm-airflow-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(16)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({self.username: self.password}))
        self.env = airflow_env(
            self.home,
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{self.username}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        )
        self.log = self.home / "api-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def airflow(self, *args: str, timeout: float = 180) -> None:
        """Run an ``airflow`` command against this server's home; fail with its output."""
        done = subprocess.run(
            [str(airflow_venv() / "bin" / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, (
            f"airflow {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )

    def start(self) -> ApiServer:
        self.airflow("db", "migrate")
        self.airflow("dags", "reserialize")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(airflow_venv() / "bin" / "airflow"),
                    "api-server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers go with it in stop()
            )
        self.wait_healthy(timeout=120)
        return self

    def wait_healthy(self, timeout: float) -> None:
        eventually_sync(self.healthy, timeout=timeout, every=0.2)

    def healthy(self) -> bool:
        """Whether the API server answers its health check; fails at once if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"airflow api-server exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def token(self) -> str:
        """A JWT from the server's token endpoint."""
        return str(
            self.call(
                "POST",
                "/auth/token",
                {"username": self.username, "password": self.password},
                token="",
            )["access_token"]
        )

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """One REST call as the admin user; the JSON answer."""
        headers = {"content-type": "application/json"}
        bearer = self.token() if token is None else token
        if bearer:
            headers["authorization"] = f"Bearer {bearer}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of ``dag_id``."""
        return list(self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=1000")["dag_runs"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> ApiServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
