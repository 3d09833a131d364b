"""A newcomer's mistakes with `qm`, each answered by one line and exit code 2, and its output
piped: tables keep every value on one line, and what prints a table also prints JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import make_site, scalar, start
from workers.requests import RequestProcessor

JOB_ID = "0b9c4c1e-6c1f-4f51-9d3a-2f7e9a4d8b10-a-collector-run-of-board"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# every command that prints a table (`qm bench` apart: a benchmark's report, with its narration)
TABLES = (
    ("sites", "list"),
    ("accounts", "list"),
    ("proxies", "list"),
    ("jobs", "list"),
    ("jobs", "show"),
    ("seeds", "list"),
    ("domains", "list"),
    ("sessions", "show"),
    ("captures", "list"),
    ("captures", "show"),
    ("outbox", "ls"),
    ("keys", "rotate"),
    ("keys", "check"),
    ("dlt", "ls"),
    ("dlt", "show"),
    ("dlt", "replay"),
    ("top",),
)


@pytest.fixture
def narrow(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """80 columns, what a pipe got before (the ``qm`` fixture asks for 250); and the test's
    broker, for `qm top`."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("QM_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)


def rows(output: str) -> list[str]:
    """A table's body lines (``│ … │``), its header and rules apart."""
    return [line for line in ANSI.sub("", output).splitlines() if line.startswith("│")]


async def test_newcomer_list_of_an_unknown_site_is_one_line_not_an_empty_table(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings)
    for args in (
        ("accounts", "list", "nosuch"),
        ("jobs", "list", "--site", "nosuch"),
        ("seeds", "list", "nosuch"),
    ):
        assert_one_red_line(await qm(*args), "no site 'nosuch'", "qm sites list")
    for args in (("accounts", "list", "board"), ("jobs", "list", "--site", "board")):
        assert (await qm(*args)).exit_code == 0  # a site that is there lists, even empty


async def test_newcomer_seed_import_with_a_bad_row_loads_nothing_and_names_it(
    engine: AsyncEngine, settings: Settings, qm: Qm, tmp_path: Path
) -> None:
    await make_site(engine, settings, n_accounts=0)
    file = tmp_path / "seeds.csv"
    good = [f"https://board.example.com/{n}\n" for n in range(6)]
    file.write_text("".join(good[:2]) + "not a url\n" + "".join(good[2:]) + "ftp://x.example/\n")
    result = await qm("seeds", "import", "board", str(file))
    assert_one_red_line(
        result, "nothing imported", "2 bad rows", "line 3:", "line 8:", "--skip-bad"
    )
    assert await scalar(engine, "SELECT count(*) FROM seeds") == 0
    skipped = await qm("seeds", "import", "board", str(file), "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert skipped.stderr.strip() == ""
    assert [line for line in skipped.stdout.splitlines() if line.strip()] == [
        "board: 6 added, 0 updated, 0 unchanged, 2 bad rows (line 3: not an http(s) URL with a "
        "host and no white space; line 8: not an http(s) URL with a host and no white space)"
        " skipped"
    ]
    assert await scalar(engine, "SELECT count(*) FROM seeds") == 6


async def test_newcomer_sites_remove_of_an_unknown_site_says_so_before_asking(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings, n_accounts=0)
    missing = await qm("sites", "remove", "nosuch")  # no input: a prompt would abort
    assert_one_red_line(missing, "no site 'nosuch'")
    assert "[y/N]" not in missing.stdout
    asked = await qm("sites", "remove", "board", input="y\n")
    assert asked.exit_code == 0 and "[y/N]" in asked.stdout, asked.output
    assert await scalar(engine, "SELECT count(*) FROM sites") == 0
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert re.search(r"qm sites remove board --yes|qm sites remove board \[--yes\]", readme)


def test_newcomer_output_folders_are_made_as_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["asyncapi", "--out", "contract/asyncapi.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "contract" / "asyncapi.json").read_text())["asyncapi"]
    result = runner.invoke(app, ["schema", "--out", "contract/schemas"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "contract" / "schemas").glob("*.schema.json"))


async def test_newcomer_piped_tables_keep_each_value_on_one_line(
    engine: AsyncEngine,
    settings: Settings,
    qm: Qm,
    processor: RequestProcessor,
    narrow: None,
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, JOB_ID))
    jobs = await qm("jobs", "list")
    assert jobs.exit_code == 0, jobs.output
    assert len(rows(jobs.stdout)) == 1 and JOB_ID in rows(jobs.stdout)[0], jobs.stdout
    for listing in (("accounts", "list", "board"), ("sites", "list")):
        result = await qm(*listing)
        assert result.exit_code == 0, result.output
        assert len(rows(result.stdout)) == 1, result.stdout  # one record, one line
    top = await qm("top", "--once")
    assert top.exit_code == 0, top.output
    headers = "".join(line for line in top.stdout.splitlines() if line.startswith("┃"))
    for header in ("oldest waiter", "grants/min", "rows waiting", "lag (oldest)", "records"):
        assert header in headers, top.stdout


async def test_newcomer_top_as_json_is_one_view(
    engine: AsyncEngine, settings: Settings, qm: Qm, processor: RequestProcessor, narrow: None
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, JOB_ID))
    result = await qm("top", "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert [(s["slug"], s["running"]) for s in view["sites"]] == [("board", 1)]
    assert set(view) == {"at", "sites", "outbox", "dead_letters", "reaper_repairs"}


def test_newcomer_every_command_that_prints_a_table_takes_json() -> None:
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    for path in TABLES:
        command = root.get_command(ctx, path[0])  # type: ignore[attr-defined]
        for name in path[1:]:
            command = command.get_command(ctx, name)
        options = {option for param in command.params for option in param.opts}
        assert "--json" in options, " ".join(path)
    # and every list or show command of every group is among them
    for group in root.list_commands(ctx):  # type: ignore[attr-defined]
        sub = root.get_command(ctx, group)  # type: ignore[attr-defined]
        for name in getattr(sub, "commands", {}):
            if name in ("list", "ls", "show"):
                assert (group, name) in TABLES, f"{group} {name}"


async def test_newcomer_top_exits_2_when_it_cannot_reach_the_broker_or_the_database(
    qm: Qm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QM_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert_one_red_line(await qm("top", "--once"), "127.0.0.1:1")
    monkeypatch.setenv("QM_DATABASE_URL", "postgresql+asyncpg://qm@127.0.0.1:1/quartermaster")
    assert_one_red_line(await qm("top", "--once"), "database", "127.0.0.1:1")
