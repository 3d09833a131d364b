"""`qm seeds` as an operator runs it, against the real database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import seeds, sites
from tests.support.captures import outbox_payloads
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import make_site, scalar
from tests.support.waiting import eventually


async def test_import_with_skip_bad_loads_the_good_rows_and_names_the_bad_ones_by_line(
    engine: AsyncEngine, settings: Settings, qm: Qm, tmp_path: Path
) -> None:
    await make_site(engine, settings, n_accounts=0)
    await qm("seeds", "add", "board", "https://board.example.com/kept", "--priority", "1")
    file = tmp_path / "seeds.csv"
    file.write_text(
        "url,interval_seconds,priority\n"
        "https://board.example.com/a,60,2\n"
        "not a url\n"
        "https://board.example.com/b\n"
        "https://board.example.com/kept,120,1\n"
        "https://board.example.com/c,-5\n"
        "https://board.example.com/a\n"
    )
    result = await qm("seeds", "import", "board", str(file), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "2 added, 1 updated, 0 unchanged, 3 bad rows (" in result.stdout
    assert "line 3: not an http(s) URL with a host and no white space" in result.stdout
    assert "line 6: interval_seconds must be positive" in result.stdout
    assert "line 7: repeats the url of line 2" in result.stdout
    assert await scalar(engine, "SELECT count(*) FROM seeds") == 3
    assert await scalar(engine, "SELECT interval_seconds FROM seeds WHERE url LIKE '%kept'") == 120
    again = await qm("seeds", "import", "board", str(file), "--skip-bad")
    assert "0 added, 0 updated, 3 unchanged, 3 bad rows" in again.stdout


async def test_import_reads_json_lines_from_stdin(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings, n_accounts=0)
    lines = "".join(
        f'{{"url": "https://board.example.com/{n}", "priority": {n}}}\n' for n in range(5)
    )
    result = await qm("seeds", "import", "board", "-", "--skip-bad", input=lines + "{broken\n")
    assert result.exit_code == 0, result.output
    assert "5 added, 0 updated, 0 unchanged, 1 bad row (line 6: not a JSON object)" in result.stdout
    listed = await qm("seeds", "list", "board", "--due", "--limit", "2")
    assert "board.example.com/4" in listed.stdout and "board.example.com/3" in listed.stdout
    assert "board.example.com/0" not in listed.stdout


async def test_disable_and_enable_move_a_seed_and_refuse_what_cannot_move(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings, n_accounts=0)
    url = "https://board.example.com/x"
    await qm("seeds", "add", "board", url)
    disabled = await qm("seeds", "disable", "board", url, "--reason", "board closed")
    assert disabled.exit_code == 0, disabled.output
    assert await scalar(engine, "SELECT disabled_reason FROM seeds") == "board closed"
    listed = await qm("seeds", "list", "board", "--status", "DISABLED")
    assert "board closed" in listed.stdout
    assert_one_red_line(await qm("seeds", "disable", "board", url), "no seed")
    seed_id = str(await scalar(engine, "SELECT id FROM seeds"))
    assert (await qm("seeds", "enable", "board", seed_id)).exit_code == 0
    assert await scalar(engine, "SELECT status::text FROM seeds") == "ACTIVE"
    assert_one_red_line(await qm("seeds", "enable", "board", seed_id), "no seed")
    # each move is an event; a disable of a held seed names the hold it ended, so the history
    # `qm audit` reads sees the seed returned before it is handed out again
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE seeds SET status = 'ASSIGNED', holder_job_id = 'j-holder',"
                " lease_token = 41, lease_expires_at = now() + interval '1 minute'"
            )
        )
    assert (await qm("seeds", "disable", "board", seed_id)).exit_code == 0
    moves = [
        e for e in await outbox_payloads(engine, settings.topic("events")) if e["entity"] == "seed"
    ]
    assert [(e["type"], e.get("lease_token"), e.get("job_id")) for e in moves] == [
        ("seed.disabled", None, None),
        ("seed.enabled", None, None),
        ("seed.disabled", 41, "j-holder"),
    ]
    assert all(e["id"] == seed_id and e.get("db_at") for e in moves)
    assert moves[0]["reason"] == "board closed"


async def test_operator_mistakes_are_one_red_line(
    engine: AsyncEngine, settings: Settings, qm: Qm, tmp_path: Path
) -> None:
    await make_site(engine, settings, n_accounts=0)
    assert_one_red_line(await qm("seeds", "add", "nowhere", "https://x.example/"), "no site")
    assert_one_red_line(await qm("seeds", "add", "board", "ftp://x.example/"), "http(s)")
    await qm("seeds", "add", "board", "https://x.example/")
    assert_one_red_line(await qm("seeds", "add", "board", "https://x.example/"), "already")
    assert_one_red_line(await qm("seeds", "import", "board", str(tmp_path / "none.csv")), "no file")
    (tmp_path / "s.csv").write_text("https://y.example/\n")
    assert_one_red_line(await qm("seeds", "import", "nowhere", str(tmp_path / "s.csv")), "no site")


async def test_a_site_removed_while_a_seed_is_added_waits_for_the_seed_and_takes_it_along(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)

    async def remove() -> bool:
        async with engine.begin() as conn:
            assert await sites.lock_site(conn, "board") is not None
            return await sites.remove_site(conn, "board") is not None

    async def waiting_on_a_lock() -> bool:
        return bool(
            await scalar(
                engine,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
        )

    async with engine.begin() as conn:  # what `qm seeds add` does, with a removal in between
        assert await seeds.site_exists(conn, "board")
        removal = asyncio.create_task(remove())
        await eventually(waiting_on_a_lock, timeout=10)
        assert await seeds.add_seed(
            conn, site="board", url="https://board.example/1", interval_seconds=60, priority=0
        )
    assert await removal  # went ahead once the seed was in, and took it along
    assert await scalar(engine, "SELECT count(*) FROM seeds") == 0
