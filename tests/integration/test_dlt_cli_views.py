"""`qm dlt ls` and `qm dlt show` against a real broker and a real database, and their one-line errors."""

from __future__ import annotations

import json
import time

from sqlalchemy.engine import make_url

from app.devstack import free_port
from app.dlt.reader import open_reader, summarize
from app.errors import InvalidMessage
from app.settings import Settings
from tests.support.dead_letters import (
    HOUR_MS,
    Letter,
    Qm,
    assert_one_red_line,
    qm_fixture,  # noqa: F401 - the fixture
    sample,
    write_dead_letters,
)


async def test_ls_counts_dead_letters_by_error_class(topics: Settings, qm: Qm) -> None:
    settings = topics
    await write_dead_letters(settings, settings.topic("requests.dlt"), sample(settings))
    await write_dead_letters(
        settings, settings.topic("captures.dlt"), [Letter(b"c", b"{}", ValueError("v"))] * 2
    )

    async with open_reader(settings) as reader:
        summaries = {s.topic: s for s in await summarize(reader)}
    requests = summaries[settings.topic("requests.dlt")]
    assert requests.records == 4
    assert dict(requests.by_error_class) == {
        "builtins.KeyError": 2,
        "app.errors.InvalidMessage": 1,
        "InvalidMessage": 1,
    }
    assert requests.oldest_ms is not None and requests.newest_ms is not None
    assert requests.newest_ms - requests.oldest_ms >= 2 * HOUR_MS - 60_000
    assert dict(summaries[settings.topic("captures.dlt")].by_error_class) == {
        "builtins.ValueError": 2
    }

    result = await qm("ls")
    assert result.exit_code == 0, result.output
    assert "2  builtins.KeyError" in result.stdout
    assert "2  builtins.ValueError" in result.stdout
    assert "(2h ago)" in result.stdout

    listed = await qm("ls", "--json")
    assert listed.exit_code == 0, listed.output
    by_topic = {row["topic"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert by_topic[settings.topic("requests.dlt")]["records"] == 4
    assert by_topic[settings.topic("captures.dlt")]["by_error_class"] == {"builtins.ValueError": 2}


async def test_show_redacts_a_canary_secret(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    canary = "CANARY-7f3a91"
    value = f'{{"type": "session.put", "storage_state": {{"cookies": [{{"v": "{canary}"}}]}}, '
    value += f'"account": {{"password": "{canary}"}}}}'
    letter = Letter(
        b"job-9",
        value.encode(),
        InvalidMessage(f"bad input token={canary}"),
        headers=(
            ("authorization", f"Bearer {canary}".encode()),
            ("note", f"password={canary}".encode()),
        ),
    )
    await write_dead_letters(settings, dlt, [letter])

    table = await qm("show", dlt)
    as_json = await qm("show", dlt, "--json")

    for result in (table, as_json):
        assert result.exit_code == 0, result.output
        assert canary not in result.output
        assert "[redacted]" in result.stdout
        assert "session.put" in result.stdout
    assert "qm.dlt.error_class" in table.stdout


async def test_show_cuts_long_values_and_honours_the_filters(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    long_value = b'{"blob": "' + b"x" * 5000 + b'"}'
    await write_dead_letters(
        settings, dlt, [*sample(settings), Letter(b"big", long_value, KeyError("z"))]
    )

    result = await qm("show", dlt, "--json", "--key", "big", "--width", "50")
    [record] = [json.loads(line) for line in result.stdout.splitlines()]

    assert record["offset"] == 4
    assert len(record["value"]) == 50 and record["value"].endswith("…")
    nothing = await qm("show", dlt, "--key", "nobody")
    assert nothing.exit_code == 0 and "nothing selected" in nothing.stdout


# --- clear errors ------------------------------------------------------------------------


async def test_an_unknown_topic_is_one_red_line_and_exit_code_2(topics: Settings, qm: Qm) -> None:
    for command in ("show", "replay"):
        assert_one_red_line(await qm(command, "no-such-topic"), "unknown topic no-such-topic")
    not_dlt = await qm("show", topics.topic("job-events"))  # which has no dead-letter topic
    assert_one_red_line(not_dlt, "is not a dead-letter topic")
    assert_one_red_line(
        await qm("replay", "requests.dlt", "--since", "soon"), "cannot read the time"
    )
    assert_one_red_line(await qm("replay", "requests.dlt", "--partition", "7"), "no partition 7")


async def test_an_empty_selection_says_nothing_selected_and_exits_0(qm: Qm) -> None:
    result = await qm("replay", "requests.dlt")
    assert result.exit_code == 0, result.output
    assert "nothing selected" in result.stdout


async def test_a_missing_original_topic_is_a_clear_error(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    gone = settings.topic("gone")
    await write_dead_letters(settings, dlt, [Letter(b"k", b"{}", "bad", original_topic=gone)])

    assert_one_red_line(await qm("replay", dlt), f"target topic {gone}", "--to")
    redirected = await qm("replay", dlt, "--to", settings.topic("requests"))
    assert "1 replayed" in redirected.stdout
    assert_one_red_line(await qm("replay", dlt, "--to", dlt, "--again"), "into itself")


async def test_an_unreachable_broker_or_database_is_one_red_line(topics: Settings, qm: Qm) -> None:
    settings = topics
    await write_dead_letters(settings, settings.topic("requests.dlt"), sample(settings))
    no_broker = {"QM_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    no_database = {
        "QM_DATABASE_URL": f"postgresql+asyncpg://qm@127.0.0.1:{free_port()}/quartermaster"
    }

    began = time.monotonic()
    assert_one_red_line(await qm("ls", env=no_broker), "Kafka cannot be reached")
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_broker), "Kafka cannot be reached"
    )
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_database), "PostgreSQL cannot be reached"
    )
    missing = make_url(settings.database_url).set(database="qm_no_such_database")
    no_such_database = {"QM_DATABASE_URL": missing.render_as_string(hide_password=False)}
    assert_one_red_line(
        await qm("replay", "requests.dlt", env=no_such_database),
        "PostgreSQL cannot be reached",
        "qm_no_such_database",
    )
    assert time.monotonic() - began < 15
