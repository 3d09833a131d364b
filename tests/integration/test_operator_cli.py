"""`qm sites|accounts|jobs` as an operator uses them, against the real database.

Input mistakes are one line and exit code 2 before the database is asked; the database being
unreachable is said only when it is; lists answer --json; tables on a terminal wrap rather than
cut.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings, get_settings
from app.store import Database
from reapers.capacity_back import CapacityBack
from tests.support.databases import empty_database
from tests.support.leasing import held_lease, make_site, request, scalar, start
from workers.requests import RequestProcessor

Qm = Callable[..., Awaitable[Result]]
SETTINGS_VARS = (
    "QM_DATABASE_URL",
    "DATABASE_URL",
    "QM_KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_BOOTSTRAP_SERVERS",
)


@pytest.fixture
def qm(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Qm]:
    """Run `qm …` in-process with the test's database and keys, 100 columns wide."""
    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("QM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    monkeypatch.setenv("COLUMNS", "100")
    runner = CliRunner()

    async def invoke(
        *args: str, input: str | None = None, env: dict[str, Any] | None = None
    ) -> Result:
        get_settings.cache_clear()
        # the command runs its own event loop, so it runs on a thread of its own
        return await asyncio.to_thread(
            runner.invoke, app, list(args), input=input, env=env, prog_name="qm"
        )

    yield invoke
    get_settings.cache_clear()


def one_red_line(result: Result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "[SQL" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def finish(
    processor: RequestProcessor, settings: Settings, engine: AsyncEngine, job_id: str, **fields: Any
) -> None:
    lease = await held_lease(engine, settings, job_id)
    fields.setdefault("outcome", "succeeded")
    await processor.process(request(settings, "job.finish", job_id, **lease, **fields))


# --- clear answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["board", "--host", "board.example.com", "--capacity", "-1"], ["--capacity", "greater than or equal to 1"]),
        (["board", "--host", "board.example.com", "--capacity", "0"], ["--capacity"]),
        (["board", "--host", "board.example.com", "--lease-seconds", "-5"], ["--lease-seconds"]),
        (["Bad Slug", "--host", "board.example.com"], ["slug", "lowercase letters"]),
        (["board", "--host", "board example.com"], ["--host", "not a host name"]),
        (["board", "--host", "board.example.com", "--session-check-url", "ftp://x"], ["--session-check-url", "http"]),
        (["board"], ["--host"]),
    ],
)  # fmt: skip
async def test_bad_input_to_sites_add_is_one_line_naming_the_option_and_changes_nothing(
    qm: Qm, engine: AsyncEngine, args: list[str], words: list[str]
) -> None:
    line = one_red_line(await qm("sites", "add", *args), *words)
    assert "qm sites add --help" in line
    assert "database" not in line
    assert await scalar(engine, "SELECT count(*) FROM sites") == 0


async def test_an_unreachable_database_is_named_without_the_dev_hint_when_settings_are_given(
    qm: Qm,
) -> None:
    url = "postgresql+asyncpg://qm:hunter2@127.0.0.1:9/quartermaster"
    line = one_red_line(
        await qm("sites", "list", env={"QM_DATABASE_URL": url}),
        "127.0.0.1:9/quartermaster",
        "cannot be reached",
    )
    assert "hunter2" not in line and ".qm-dev.env" not in line


async def test_an_unreachable_broker_is_one_line_naming_it(qm: Qm) -> None:
    result = await qm("topics", env={"QM_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    line = one_red_line(result, "Kafka broker at 127.0.0.1:9", "cannot be reached")
    assert "database" not in line and ".qm-dev.env" not in line


async def test_no_database_settings_at_all_hints_at_the_dev_env_file(qm: Qm) -> None:
    result = await qm("jobs", "list", env={"QM_DATABASE_URL": None})
    one_red_line(
        result, "127.0.0.1:5432", "cannot be reached", "QM_DATABASE_URL is not set", ".qm-dev.env"
    )


async def test_a_database_without_the_schema_says_to_migrate(
    qm: Qm, postgres_admin_url: str
) -> None:
    async with empty_database(postgres_admin_url) as url:
        result = await qm("sites", "list", env={"QM_DATABASE_URL": url})
        line = one_red_line(result, "not migrated", "qm migrate")
        assert "SELECT" not in line


async def test_help_shows_no_type_after_flags(qm: Qm) -> None:
    result = await qm("accounts", "add", "--help")
    assert result.exit_code == 0
    assert "--secret-stdin" in result.stdout and "<bool>" not in result.stdout


async def test_tables_on_a_terminal_wrap_long_values_instead_of_cutting_them(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings)
    job_id = "a-job-with-a-rather-long-identifier-0123456789abcdef-0123456789"
    await processor.process(start(settings, job_id))
    # a terminal 60 columns wide (piped, tables keep each value on one line: test_newcomer_cli_answers)
    result = await qm("jobs", "list", env={"COLUMNS": "60", "TTY_COMPATIBLE": "1"})
    assert result.exit_code == 0, result.output
    shown = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert "…" not in shown
    assert max(len(line) for line in shown.splitlines()) <= 60
    first_column = "".join(re.findall(r"^[┃│]\s*(\S+)", shown, re.M))
    assert job_id in first_column


# --- sites ----------------------------------------------------------------------------------


async def test_sites_set_changes_only_what_is_given_and_list_shows_it_as_json(qm: Qm) -> None:
    assert (await qm("sites", "add", "board", "--host", "board.example.com")).exit_code == 0
    result = await qm(
        "sites",
        "set",
        "board",
        "--capacity",
        "3",
        "--dag-id",
        "board_ingest",
        "--host",
        "new.example.com:8443",
    )
    assert result.exit_code == 0, result.output
    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert site["capacity"] == 3 and site["dag_id"] == "board_ingest"
    assert site["host"] == "new.example.com:8443" and site["lease_seconds"] == 300
    assert (await qm("sites", "set", "board", "--dag-id", "")).exit_code == 0
    assert json_lines(await qm("sites", "list", "--json"))[0]["dag_id"] is None
    one_red_line(await qm("sites", "set", "nowhere", "--capacity", "2"), "no site 'nowhere'")
    one_red_line(await qm("sites", "set", "board"), "nothing to change")
    one_red_line(
        await qm("sites", "add", "board", "--host", "x.example.com"),
        "exists already",
        "qm sites set",
    )


async def test_a_raised_capacity_lets_a_waiting_job_through_within_one_sweep(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, n_accounts=2)
    await processor.process(start(settings, "first"))
    await processor.process(start(settings, "second"))
    assert (await CapacityBack(settings, Database(engine)).run_once()).changed == []

    assert (await qm("sites", "set", "board", "--capacity", "2")).exit_code == 0

    assert (await CapacityBack(settings, Database(engine)).run_once()).changed == ["second"]


async def test_a_capacity_set_on_a_paused_site_keeps_it_paused_and_comes_back_on_resume(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, n_accounts=3)  # capacity 1
    await processor.process(start(settings, "waiting"))
    await processor.process(start(settings, "second"))
    assert (await qm("sites", "pause", "board")).exit_code == 0

    raised = await qm("sites", "set", "board", "--capacity", "3")

    assert raised.exit_code == 0 and "paused: capacity 3 when resumed" in raised.stdout
    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert site["capacity"] == 0 and site["paused_capacity"] == 3
    assert (await CapacityBack(settings, Database(engine)).run_once()).changed == []
    assert (await qm("sites", "resume", "board")).exit_code == 0
    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert site["capacity"] == 3 and site["paused_capacity"] is None
    assert (await CapacityBack(settings, Database(engine)).run_once()).changed == ["second"]


async def test_a_site_with_a_running_job_is_not_removed_and_one_without_is_removed_with_its_history(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, n_accounts=2)
    await processor.process(start(settings, "live"))
    one_red_line(
        await qm("sites", "remove", "board", "--yes"),
        "1 jobs waiting or running",
        "qm jobs list --site board",
    )
    assert await scalar(engine, "SELECT count(*) FROM sites") == 1
    await finish(processor, settings, engine, "live")

    assert (await qm("sites", "remove", "board", input="n\n")).exit_code == 2  # not confirmed
    result = await qm("sites", "remove", "board", input="y\n")

    assert result.exit_code == 0, result.output
    for table_name in ("sites", "accounts", "jobs", "job_grants"):
        assert await scalar(engine, f"SELECT count(*) FROM {table_name}") == 0


async def test_sites_list_counts_resting_accounts_apart_from_ready_ones(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, capacity=2, n_accounts=3, cooldown_seconds=600)
    await processor.process(start(settings, "done"))
    await processor.process(start(settings, "busy"))
    await finish(processor, settings, engine, "done")  # its account rests 600 s
    await processor.process(start(settings, "waiting-1"))
    (site,) = json_lines(await qm("sites", "list", "--json"))
    assert (site["accounts_ready"], site["accounts_resting"], site["accounts_using"]) == (0, 1, 2)
    assert (site["running"], site["waiting"]) == (2, 0)
    table_out = (await qm("sites", "list")).stdout
    assert "1 resting, 2 using" in table_out and "2 of 2" in table_out


# --- accounts -------------------------------------------------------------------------------


async def test_accounts_list_names_the_holding_collector_and_remove_refuses_a_held_account(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings)
    await processor.process(start(settings, "job-1", collector="crawler-7"))
    (account,) = json_lines(await qm("accounts", "list", "board", "--json"))
    assert account["holder_collector"] == "crawler-7" and account["holder_job_id"] == "job-1"
    assert "crawler-7" in (await qm("accounts", "list")).stdout
    one_red_line(await qm("accounts", "remove", "board", "user0@board"), "a job holds it")

    await finish(processor, settings, engine, "job-1")
    result = await qm("accounts", "remove", "board", "user0@board")

    assert result.exit_code == 0, result.output
    assert await scalar(engine, "SELECT count(*) FROM accounts") == 0
    assert await scalar(engine, "SELECT account_id FROM job_grants") is not None  # history kept
    assert await scalar(engine, "SELECT account_id FROM jobs") is None
    one_red_line(await qm("accounts", "remove", "board", "user0@board"), "does not exist")


async def test_accounts_add_checks_its_input_and_never_echoes_the_secret(
    qm: Qm, engine: AsyncEngine
) -> None:
    assert (await qm("sites", "add", "board", "--host", "board.example.com")).exit_code == 0
    one_red_line(
        await qm("accounts", "add", "nowhere", "alice", "--secret-stdin", input="pw\n"),
        "no site 'nowhere'",
    )
    one_red_line(
        await qm("accounts", "add", "board", " alice", "--secret-stdin", input="pw\n"), "user name"
    )
    one_red_line(
        await qm("accounts", "add", "board", "alice", "--secret-stdin", input="\n"),
        "secret is empty",
    )
    result = await qm(
        "accounts", "add", "board", "alice", "--secret-stdin", input="s3cr3t-canary\n"
    )
    assert result.exit_code == 0 and "s3cr3t-canary" not in result.output
    assert "s3cr3t-canary" not in (await qm("accounts", "list", "--json")).stdout


# --- jobs -----------------------------------------------------------------------------------


async def test_jobs_list_filters_by_site_status_and_collector(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings)
    await make_site(engine, settings, "forum")
    await processor.process(start(settings, "b1", collector="alpha"))
    await processor.process(start(settings, "b2", collector="beta"))
    await processor.process(start(settings, "f1", site="forum", collector="alpha"))

    everything = json_lines(await qm("jobs", "list", "--json"))
    assert {row["id"] for row in everything} == {"b1", "b2", "f1"}
    waiting = json_lines(await qm("jobs", "list", "--status", "queued", "--json"))
    assert [(row["id"], row["position"]) for row in waiting] == [("b2", 1)]
    alpha_board = json_lines(
        await qm("jobs", "list", "--site", "board", "--collector", "alpha", "--json")
    )
    assert [row["id"] for row in alpha_board] == ["b1"]
    one_red_line(await qm("jobs", "list", "--status", "sleeping"), "--status")


async def test_jobs_show_tells_a_waiters_position_and_why_it_waits(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings, cooldown_seconds=600)
    await processor.process(start(settings, "first", collector="crawler-1"))
    await processor.process(start(settings, "second"))
    await processor.process(start(settings, "third"))

    (third,) = json_lines(await qm("jobs", "show", "third", "--json"))
    assert third["position"] == 2
    because = " ".join(third["waits_because"])
    assert "1 job(s)" in because and "at capacity (1 running of 1)" in because

    await finish(processor, settings, engine, "first")  # the only account rests 600 s
    (second,) = json_lines(await qm("jobs", "show", "second", "--json"))
    rested_at = await scalar(engine, "SELECT available_at FROM accounts")
    assert second["position"] == 1
    assert second["waits_because"] == [
        f"no account free until {rested_at.isoformat(timespec='seconds')} (cooldown after use)"
    ]

    (first,) = json_lines(await qm("jobs", "show", "first", "--json"))
    assert [entry["what"].split(":")[0] for entry in first["history"]] == [
        "QUEUED (job.start)",
        "RUNNING",
        "lease 1 ended",
        "SUCCEEDED",
    ]
    shown = await qm("jobs", "show", "first")
    assert "crawler-1" in shown.stdout and "user0@board" in shown.stdout
    one_red_line(await qm("jobs", "show", "nope"), "no job 'nope'")


async def test_a_job_blocked_by_accounts_blocked_for_the_operator_says_so(
    qm: Qm, settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await make_site(engine, settings)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE sites SET block_cooldown_seconds = 0"))
    await processor.process(start(settings, "blocker"))
    await finish(processor, settings, engine, "blocker", outcome="blocked", reason="captcha")
    await processor.process(start(settings, "waiter"))

    (waiter,) = json_lines(await qm("jobs", "show", "waiter", "--json"))

    assert waiter["waits_because"] == [
        "no account free: 1 blocked until an operator unblocks (`qm accounts unblock board USER`)"
    ]


async def test_domains_list_answers_json(qm: Qm) -> None:
    assert (await qm("sites", "add", "board", "--host", "board.example.com")).exit_code == 0
    added = await qm("domains", "add", "board", "board.example.com", "board.example.org")
    assert added.exit_code == 0, added.output
    (rewrite,) = json_lines(await qm("domains", "list", "board", "--json"))
    assert (rewrite["from"], rewrite["to"], rewrite["urls_rewritten"]) == (
        "board.example.com",
        "board.example.org",
        "0",
    )


async def test_seeds_list_answers_json(qm: Qm) -> None:
    assert (await qm("sites", "add", "board", "--host", "board.example.com")).exit_code == 0
    added = await qm("seeds", "add", "board", "https://board.example.com/new", "--priority", "5")
    assert added.exit_code == 0, added.output
    (seed,) = json_lines(await qm("seeds", "list", "board", "--json"))
    assert (seed["url"], seed["priority"], seed["status"]) == (
        "https://board.example.com/new",
        5,
        "ACTIVE",
    )
