"""`qm dlt replay` against a real broker and a real database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from app.dlt import PREFIX, REPLAYED_FROM, OffsetRange
from app.dlt.reader import DltError, Selection
from app.dlt.replay import ReplayOptions, replay
from app.errors import InvalidMessage
from app.settings import Settings
from app.store.dlt_replays import (
    ReplayedOffset,
    list_replayed,
    record_replays,
    try_lock_topic,
    unlock_topic,
)
from tests.support.dead_letters import (
    HOUR_MS,
    Letter,
    Qm,
    Written,
    create_topic,
    ledger,
    qm_fixture,  # noqa: F401 - the fixture
    read_topic,
    sample,
    write_dead_letters,
)

# --- replay ------------------------------------------------------------------------------


async def test_replay_lands_on_the_original_topic_with_key_value_and_headers_kept(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    written = await write_dead_letters(settings, dlt, sample(settings))

    result = await qm("replay", dlt, "--error-class", "InvalidMessage")

    assert result.exit_code == 0, result.output
    assert "2 selected, 2 replayed" in result.stdout
    chosen = [w for w in written if w.letter.error_class.endswith("InvalidMessage")]
    assert all(w.letter.headers for w in chosen)
    copies = await read_topic(settings, settings.topic("requests"))
    assert sorted((k, v) for k, v, _ in copies) == sorted(
        (w.letter.key, w.letter.value) for w in chosen
    )
    for key, value, headers in copies:
        [source] = [w for w in chosen if (w.letter.key, w.letter.value) == (key, value)]
        assert headers == [
            *source.letter.headers,
            (REPLAYED_FROM, f"{dlt}:{source.partition}:{source.offset}".encode()),
        ]
        assert not any(name.startswith(PREFIX) for name, _ in headers)
    assert await ledger(engine) == [
        (dlt, w.partition, w.offset, settings.topic("requests")) for w in chosen
    ]


async def test_a_second_replay_replays_nothing_twice_and_again_does(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    target = settings.topic("requests")
    await write_dead_letters(settings, dlt, sample(settings))

    first = await qm("replay", "requests")  # short names work too
    second = await qm("replay", dlt)
    assert "4 selected, 4 replayed" in first.stdout
    assert "4 selected, 0 replayed" in second.stdout
    assert "4 skipped as already replayed" in second.stdout
    assert len(await read_topic(settings, target)) == 4

    await write_dead_letters(settings, dlt, sample(settings)[:1])
    third = await qm("replay", dlt)
    assert "5 selected, 1 replayed" in third.stdout
    assert len(await read_topic(settings, target)) == 5

    again = await qm("replay", dlt, "--again", "--key", "job-1")
    assert "3 selected, 3 replayed" in again.stdout
    assert len(await read_topic(settings, target)) == 8
    assert len(await ledger(engine)) == 5


async def test_dry_run_lists_what_would_go_and_sends_and_records_nothing(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings))
    await qm("replay", dlt, "--to-offset", "0")

    result = await qm("replay", dlt, "--dry-run")

    assert result.exit_code == 0, result.output
    assert "dry run: 4 selected, 3 would be replayed, 1 skipped as already replayed" in (
        result.stdout
    )
    for offset in (1, 2, 3):
        assert f"0:{offset}" in result.stdout
    assert len(await read_topic(settings, settings.topic("requests"))) == 1
    assert len(await ledger(engine)) == 1


async def test_newcomer_dry_run_as_json_is_the_plan_and_sends_nothing(
    topics: Settings, qm: Qm, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings))
    await qm("replay", dlt, "--to-offset", "0")

    result = await qm("replay", dlt, "--dry-run", "--json")

    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["dry_run"], plan["selected"], plan["already_replayed"]) == (True, 4, 1)
    assert [(p["partition"], p["offset"]) for p in plan["planned"]] == [(0, 1), (0, 2), (0, 3)]
    assert {p["to"] for p in plan["planned"]} == {settings.topic("requests")}
    assert len(await read_topic(settings, settings.topic("requests"))) == 1
    assert len(await ledger(engine)) == 1


async def test_concurrent_replays_send_each_record_once(
    topics: Settings, engine: AsyncEngine
) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings) * 5)

    async def one_run() -> int:
        try:
            report = await replay(settings, dlt, Selection(), ReplayOptions())
        except DltError as exc:
            assert "another `qm dlt replay`" in str(exc)
            return 0
        return report.replayed

    totals = await asyncio.gather(*(one_run() for _ in range(4)))

    assert sum(totals) == 20
    assert len(await read_topic(settings, settings.topic("requests"))) == 20
    assert len(await ledger(engine)) == 20


async def test_concurrent_ledger_writes_record_each_offset_exactly_once(
    engine: AsyncEngine,
) -> None:
    rows = [ReplayedOffset(0, offset, "qm.requests") for offset in range(50)]

    async def record() -> set[tuple[int, int]]:
        async with engine.begin() as conn:
            return await record_replays(conn, "qm.requests.dlt", rows)

    winners = await asyncio.gather(*(record() for _ in range(5)))

    assert sum(len(won) for won in winners) == 50
    assert set().union(*winners) == {(0, offset) for offset in range(50)}
    async with engine.connect() as conn:
        ranges = [OffsetRange(0, 10, 20)]
        assert await list_replayed(conn, "qm.requests.dlt", ranges) == {
            (0, offset) for offset in range(10, 20)
        }


async def test_one_replay_lock_per_topic(engine: AsyncEngine) -> None:
    async with engine.connect() as first, engine.connect() as second:
        assert await try_lock_topic(first, "qm.requests.dlt")
        assert not await try_lock_topic(second, "qm.requests.dlt")
        assert await try_lock_topic(second, "qm.captures.dlt")
        await unlock_topic(first, "qm.requests.dlt")
        assert await try_lock_topic(second, "qm.requests.dlt")


async def test_rate_spaces_the_sends(topics: Settings) -> None:
    settings = topics
    dlt = settings.topic("requests.dlt")
    await write_dead_letters(settings, dlt, sample(settings))

    began = time.monotonic()
    report = await replay(settings, dlt, Selection(), ReplayOptions(rate=10))

    assert report.replayed == 4
    assert time.monotonic() - began >= 0.3  # four sends at ten a second: three gaps


# --- filters -----------------------------------------------------------------------------


async def test_each_filter_selects_exactly_what_it_says(topics: Settings, qm: Qm) -> None:
    settings = topics
    dlt, original = settings.topic("extra.dlt"), settings.topic("extra")
    await create_topic(settings, dlt, 3)
    await create_topic(settings, original, 3)
    now = int(time.time() * 1000)
    letters = [
        Letter(
            f"k{n % 2}".encode(),
            f'{{"n": {n}}}'.encode(),
            [InvalidMessage("x"), KeyError("y"), "bad"][(n // 3) % 3],
            partition=n % 3,
            timestamp_ms=now - (12 - n) * HOUR_MS,
        )
        for n in range(12)
    ]
    written = await write_dead_letters(settings, dlt, letters)
    iso = datetime.fromtimestamp((now - 6 * HOUR_MS) / 1000, UTC).isoformat()

    async def selected(selection: Selection) -> set[tuple[int, int]]:
        report = await replay(settings, dlt, selection, ReplayOptions(dry_run=True))
        assert report.selected == len(report.planned)
        assert {target for _, target in report.planned} <= {original}
        return {(letter.partition, letter.offset) for letter, _ in report.planned}

    def expect(predicate: Callable[[Written], bool]) -> set[tuple[int, int]]:
        return {(w.partition, w.offset) for w in written if predicate(w)}

    cases: list[tuple[Selection, Callable[[Written], bool]]] = [
        (Selection(), lambda w: True),
        (Selection(partitions=frozenset({1})), lambda w: w.partition == 1),
        (Selection(partitions=frozenset({0, 2})), lambda w: w.partition != 1),
        (Selection(from_offset=1), lambda w: w.offset >= 1),
        (Selection(to_offset=1), lambda w: w.offset <= 1),
        (Selection(from_offset=1, to_offset=2), lambda w: 1 <= w.offset <= 2),
        (Selection(since_ms=now - 6 * HOUR_MS), lambda w: w.timestamp_ms >= now - 6 * HOUR_MS),
        (Selection(until_ms=now - 6 * HOUR_MS), lambda w: w.timestamp_ms < now - 6 * HOUR_MS),
        (
            Selection(since_ms=now - 9 * HOUR_MS, until_ms=now - 3 * HOUR_MS),
            lambda w: now - 9 * HOUR_MS <= w.timestamp_ms < now - 3 * HOUR_MS,
        ),
        (
            Selection(error_class="builtins.KeyError"),
            lambda w: w.letter.error_class.endswith("KeyError"),
        ),
        (
            Selection(error_class="InvalidMessage"),
            lambda w: "InvalidMessage" in w.letter.error_class,
        ),
        (
            Selection(error_class="app.errors.InvalidMessage"),
            lambda w: w.letter.error_class == "app.errors.InvalidMessage",
        ),
        (Selection(error_class="Invalid"), lambda w: False),
        (Selection(key="k1"), lambda w: w.letter.key == b"k1"),
        (Selection(key="nope"), lambda w: False),
        (
            Selection(partitions=frozenset({0}), key="k0", since_ms=now - 6 * HOUR_MS),
            lambda w: (
                w.partition == 0 and w.letter.key == b"k0" and w.timestamp_ms >= now - 6 * HOUR_MS
            ),
        ),
    ]
    for selection, predicate in cases:
        assert await selected(selection) == expect(predicate), selection

    # the same through the command line, with an ISO time
    result = await qm("replay", dlt, "--dry-run", "--partition", "2", "--since", iso)
    wanted = expect(lambda w: w.partition == 2 and w.timestamp_ms >= now - 6 * HOUR_MS)
    assert f"dry run: {len(wanted)} selected" in result.stdout


# --- ls and show -------------------------------------------------------------------------
