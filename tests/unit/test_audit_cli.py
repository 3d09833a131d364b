"""`qm audit leases --file`: an offline history in, violations with their events, a summary and
the exit code out."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from app.cli import app
from tests.unit.test_audit_checker import History, clean_history


def write(path: Path, history: History, *extra: str) -> Path:
    lines = [json.dumps(event) for event in history.events]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def audit(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "leases", *args])
    return result.exit_code, result.stdout


def test_audit_cli_exits_0_on_a_clean_history_and_1_naming_the_proving_events(
    tmp_path: Path,
) -> None:
    code, out = audit("--file", str(write(tmp_path / "clean.jsonl", clean_history())))
    assert code == 0, out
    assert "no violations" in out and "lease grants" in out
    broken = History()
    broken.grant(0, "j1", 1, capacity=5)
    broken.grant(10, "j2", 2, capacity=5)
    exported = json.dumps({"topic": "qm.events", "partition": 3, "offset": 41,
                           "value": {**broken.events[1], "id": "j3", "lease_token": 3}})  # fmt: skip
    path = write(tmp_path / "broken.jsonl", broken, exported, "not json")
    code, out = audit("--file", str(path))
    assert code == 1, out
    assert "VIOLATION overlap account a1" in out
    flat = "".join(out.split())  # the console wraps long lines wherever it likes
    assert f"{path}[0]@1,{path}[0]@2" in flat  # the two grants' lines
    assert "qm.events[3]@41" in flat  # the exported record keeps its topic position
    assert f"unreadable{path}[0]@4:notJSON" in flat


def test_audit_cli_json_holds_the_summary_and_every_violation(tmp_path: Path) -> None:
    history = History()
    history.handoff(0, "cap-1", 10)
    history.handoff(1, "cap-1", 11)
    code, out = audit("--file", str(write(tmp_path / "h.jsonl", history)), "--json")
    assert code == 1
    report = json.loads(out)
    [violation] = report["violations"]
    assert violation["kind"] == "capture_handed_off_twice"
    assert [e["offset"] for e in violation["events"]] == [1, 2]
    assert report["summary"]["violations"]["capture_handed_off_twice"] == 1
    assert report["summary"]["events"] == 2


def test_audit_cli_refuses_a_file_with_kafka_bounds_and_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "leases", "--file", "x", "--since", "1h"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["audit", "leases", "--file", str(tmp_path / "none")])
    assert result.exit_code == 2 and "cannot read" in result.stderr
