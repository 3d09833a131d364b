"""The composition root: `qm run` offers what it registers, and an OS process builds its shared
services once (one secret box for every sweep of a reaper, one set of handoff targets)."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import app.cli
from app.crypto import SecretBox
from app.handoff import Delivery
from app.root import PROCESSES, Root, process, run_processes
from app.settings import Settings, get_settings
from reapers.runner import run_reapers


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("QM_DATABASE_URL", "DATABASE_URL", "QM_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """What `qm run` asked the root to start, instead of starting it."""
    calls: list[list[str]] = []

    async def record(settings: Settings, names: list[str]) -> None:
        calls.append(names)

    monkeypatch.setattr("app.root.run_processes", record)
    return calls


def test_qm_run_all_starts_every_registered_process_in_its_order(started: list[list[str]]) -> None:
    result = CliRunner().invoke(app.cli.app, ["run", "all"])
    assert result.exit_code == 0, result.output
    assert started == [list(PROCESSES)]


def test_qm_run_offers_each_registered_process_and_nothing_else(started: list[list[str]]) -> None:
    help_text = CliRunner().invoke(app.cli.app, ["run", "--help"]).output
    assert f"all, or one of: {', '.join(PROCESSES)}" in " ".join(help_text.split())
    for name in PROCESSES:
        assert CliRunner().invoke(app.cli.app, ["run", name]).exit_code == 0
    assert started == [[name] for name in PROCESSES]
    unknown = CliRunner().invoke(app.cli.app, ["run", "sweeper"])
    assert unknown.exit_code == 2 and started == [[name] for name in PROCESSES]


def test_every_process_lives_in_workers_or_reapers() -> None:
    assert {name: process(name).__module__.split(".")[0] for name in PROCESSES} == {
        "worker": "workers",
        "relay": "workers",
        "reaper": "reapers",
        "handoff": "workers",
        "alerts": "workers",
        "auditor": "workers",
        "console": "workers",
    }


def test_one_reaper_process_builds_one_secret_box(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[SecretBox] = []
    init = SecretBox.__init__

    def counting(self: SecretBox, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(SecretBox, "__init__", counting)

    async def one_reaper() -> None:
        stop = asyncio.Event()
        stop.set()  # the sweeps are built, then the loop ends before a round
        wiring = Root(Settings()).wiring("reaper", stop)
        try:
            await run_reapers(wiring)
        finally:
            await wiring.close()

    asyncio.run(one_reaper())
    assert len(built) == 1


def test_the_processes_of_one_root_share_its_secret_box_and_handoff_targets() -> None:
    root = Root(Settings())
    stop = asyncio.Event()
    worker, reaper = root.wiring("worker", stop), root.wiring("reaper", stop)
    assert worker.secrets is reaper.secrets is root.secrets
    assert worker.handoff_targets is reaper.handoff_targets is root.handoff_targets


def test_the_handoff_targets_are_built_once_not_per_capture() -> None:
    targets = Root(Settings()).handoff_targets
    first = targets(delivery("cap-1"))
    second = targets(delivery("cap-2"))
    assert [t.name for t in first] == ["webhook", "airflow"]
    assert all(a is b for a, b in zip(first, second, strict=True))


def delivery(capture_id: str) -> Delivery:
    return Delivery(
        capture_id=capture_id, job_id="j", site="s", url="https://a.example/", storage_uri="s3://b/1", sha256="0" * 64,
        content_type="text/html", size=1, captured_at=datetime(2026, 1, 1, tzinfo=UTC), meta={},
        attempt=1, dag_id="d", webhook_url="https://hooks.example/c",
    )  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]


def imports(package: str) -> dict[str, list[tuple[str, bool]]]:
    """Each module of ``package``: what it imports of ours, and whether only for type checking."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                found.setdefault(module, []).append((name, id(node) in typing_only))
    return found


def test_the_root_is_the_one_module_of_app_that_imports_the_processes() -> None:
    importers = {
        module
        for module, names in imports("app").items()
        if any(name.split(".")[0] in {"workers", "reapers"} for name, _ in names)
    }
    assert importers <= {"app.root"}  # which names them in PROCESSES, imported when run


def test_the_processes_import_the_root_for_annotations_only() -> None:
    for package in ("workers", "reapers"):
        for module, names in imports(package).items():
            for name, typing_only in names:
                if name == "app.root":
                    assert typing_only, f"{module} imports app.root at run time"


async def test_a_process_that_fails_after_it_stopped_the_run_ends_the_run_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a consumer that can read no more sets stop (every process stops) and its process then
    # raises: the run must end as failed, for a supervisor that restarts only on failure
    async def consumer_failed(wiring: Any) -> None:
        wiring.stop.set()
        # its consumers' stop (their commits, leaving the group) takes a while: the stop is seen
        # by every process first, and this process raises only after that
        await asyncio.sleep(0.1)
        raise RuntimeError("a consumer could read no more")

    async def stops_when_told(wiring: Any) -> None:
        await wiring.stop.wait()

    async def nothing_refused(settings: Any) -> None:
        return None

    found = {"worker": consumer_failed, "relay": stops_when_told}
    monkeypatch.setattr("app.root.process", lambda name: found[name])
    monkeypatch.setattr("app.root.refuse_to_start_when_refused", nothing_refused)
    settings = Settings(metrics_port=0)

    with pytest.raises(RuntimeError, match="could read no more"):
        await asyncio.wait_for(run_processes(settings, ["worker", "relay"]), 30)
