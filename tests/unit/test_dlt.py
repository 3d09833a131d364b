"""Dead letters without a broker: headers, redaction, the shared filters, pacing, replay copies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, Field, ValidationError

from app.dlt import (
    MAX_ERROR_MESSAGE,
    PREFIX,
    REDACTED,
    REPLAYED_FROM,
    OffsetRange,
    Origin,
    dead_letter_headers,
    header,
    redact,
    redact_bytes,
    redact_header,
)
from app.dlt.reader import (
    DeadLetter,
    DltError,
    Selection,
    TopicSummary,
    parse_coordinates,
    parse_time,
)
from app.dlt.replay import Pacer, replay_headers, target_of
from app.errors import InvalidMessage, describe, unexpected_delay
from app.outbox.writer import MESSAGE_ID

CANARY = "CANARY-51c0"


class Error(Exception):
    """An exception whose name is a suffix of others': the filter must not take those."""


ORIGIN = Origin("qm.requests", 3, 42, 1_700_000_000_000, "qm-claim-workers")


def letter(
    offset: int = 0,
    *,
    partition: int = 0,
    key: bytes | None = b"job-1",
    timestamp_ms: int = 1_000,
    error: BaseException | str = "bad",
    headers: tuple[tuple[str, bytes], ...] = (("trace", b"t"),),
) -> DeadLetter:
    return DeadLetter(
        topic="qm.requests.dlt",
        partition=partition,
        offset=offset,
        timestamp_ms=timestamp_ms,
        key=key,
        value=b'{"n": 1}',
        headers=tuple(dead_letter_headers(list(headers), ORIGIN, error, attempts=2)),
    )


# --- headers -----------------------------------------------------------------------------


def test_dead_letter_headers_keep_the_originals_and_say_where_and_why() -> None:
    stale = [("trace", b"t"), (PREFIX + "error_class", b"Old"), (PREFIX + "attempts", b"9")]
    when = datetime(2024, 5, 1, tzinfo=UTC)

    headers = dead_letter_headers(stale, ORIGIN, KeyError("site"), attempts=3, failed_at=when)

    assert headers[0] == ("trace", b"t")
    assert [name for name, _ in headers].count(PREFIX + "error_class") == 1
    assert header(headers, PREFIX + "original_topic") == "qm.requests"
    assert header(headers, PREFIX + "original_partition") == "3"
    assert header(headers, PREFIX + "original_offset") == "42"
    assert header(headers, PREFIX + "consumer_group") == "qm-claim-workers"
    assert header(headers, PREFIX + "error_class") == "builtins.KeyError"
    assert header(headers, PREFIX + "attempts") == "3"
    assert header(headers, PREFIX + "failed_at") == when.isoformat()


def test_a_string_error_is_an_invalid_message_and_its_text_is_redacted_and_bounded() -> None:
    headers = dead_letter_headers([], ORIGIN, f"token={CANARY} " + "x" * 5000, attempts=1)

    message = header(headers, PREFIX + "error_message") or ""
    assert header(headers, PREFIX + "error_class") == "InvalidMessage"
    assert CANARY not in message
    assert len(message) == MAX_ERROR_MESSAGE and message.endswith("…")


# --- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        f"password={CANARY}",
        f'{{"secret": "{CANARY}"}}',
        f"api-key: '{CANARY}' next",
        f'x {{"storage_state": {{"cookies": [{{"value": "{CANARY}"}}]}}}}',
        f"cookies=[{{'value': '{CANARY}'}}]",
        f"cannot connect to postgresql+asyncpg://qm:{CANARY}@db:5432/qm",
        f"POST https://hooks:{CANARY}@example.com/in failed",
    ],
)
def test_redact_hides_secret_values(message: str) -> None:
    cleaned = redact(message)
    assert CANARY not in cleaned
    assert "[redacted" in cleaned  # it says what was removed
    assert redact(cleaned) == cleaned


def test_redact_hides_the_input_of_a_secret_field_in_a_validation_error() -> None:
    class Account(BaseModel):
        password: str = Field(max_length=3)
        site: int

    with pytest.raises(ValidationError) as caught:
        Account(password=CANARY, site="abc")  # type: ignore[arg-type]

    cleaned = redact(str(caught.value))
    assert CANARY not in cleaned
    assert "input_value='abc'" in cleaned  # inputs of other fields stay, they help


def test_redact_bytes_walks_json_and_hides_secret_fields_whole() -> None:
    raw = f'{{"job": "j1", "account": {{"password": "{CANARY}", "cookies": [1]}}}}'.encode()

    shown = redact_bytes(raw) or ""

    assert CANARY not in shown
    assert '"job":"j1"' in shown
    assert '"cookies":"[redacted]"' in shown


def test_redact_bytes_bounds_length_and_survives_bytes_that_are_not_text() -> None:
    assert redact_bytes(None) is None
    assert len(redact_bytes(b"a" * 500, limit=40) or "") == 40
    assert redact_bytes(b"\xff\xfeok") == "\ufffd\ufffdok"


def test_redact_header_hides_secret_named_headers_whole() -> None:
    assert redact_header("Authorization", f"Bearer {CANARY}".encode()) == REDACTED
    assert redact_header("x-session-token", CANARY.encode()) == REDACTED
    assert redact_header("note", f"password={CANARY}".encode()) == f"password={REDACTED}"
    assert redact_header(PREFIX + "error_class", b"builtins.KeyError") == "builtins.KeyError"


# --- the shared filters ------------------------------------------------------------------


def test_an_empty_selection_matches_everything() -> None:
    assert Selection().matches(letter(key=None))


@pytest.mark.parametrize(
    ("selection", "picked", "left"),
    [
        (Selection(partitions=frozenset({1, 2})), letter(partition=2), letter(partition=0)),
        (Selection(from_offset=5), letter(5), letter(4)),
        (Selection(to_offset=5), letter(5), letter(6)),
        (Selection(since_ms=1_000), letter(timestamp_ms=1_000), letter(timestamp_ms=999)),
        (Selection(until_ms=1_000), letter(timestamp_ms=999), letter(timestamp_ms=1_000)),
        (Selection(key="job-1"), letter(key=b"job-1"), letter(key=b"job-10")),
        (Selection(key="job-1"), letter(key=b"job-1"), letter(key=None)),
        (Selection(error_class="KeyError"), letter(error=KeyError()), letter(error=ValueError())),
        (
            Selection(error_class="builtins.KeyError"),
            letter(error=KeyError()),
            letter(error="KeyError"),
        ),
        (
            Selection(error_class="InvalidMessage"),
            letter(error=InvalidMessage()),
            letter(error=KeyError()),
        ),
        (Selection(error_class="Error"), letter(error=Error()), letter(error=KeyError())),
    ],
)
def test_each_filter_picks_what_it_says(
    selection: Selection, picked: DeadLetter, left: DeadLetter
) -> None:
    assert selection.matches(picked)
    assert not selection.matches(left)


def test_parse_time_reads_iso_8601_and_ages() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    noon_ms = int(now.timestamp() * 1000)

    assert parse_time("2024-05-01T12:00:00Z") == noon_ms
    assert parse_time("2024-05-01T12:00") == noon_ms  # no zone: UTC
    assert parse_time("2024-05-01T14:00+02:00") == noon_ms
    assert parse_time("90s", now) == noon_ms - 90_000
    assert parse_time("30m", now) == noon_ms - 30 * 60_000
    assert parse_time("2h", now) == noon_ms - 2 * 3_600_000
    assert parse_time("1.5d", now) == noon_ms - 36 * 3_600_000
    assert parse_time("1w", now) == noon_ms - 7 * 86_400_000
    with pytest.raises(DltError, match="cannot read the time"):
        parse_time("yesterday")


# --- replay ------------------------------------------------------------------------------


def test_a_replayed_copy_drops_the_dlt_headers_and_says_where_it_came_from() -> None:
    dead = letter(7, partition=0, headers=(("trace", b"t"), (REPLAYED_FROM, b"old:0:1")))

    assert replay_headers(dead) == [("trace", b"t"), (REPLAYED_FROM, b"qm.requests.dlt:0:7")]


def test_a_copy_goes_to_to_else_the_original_topic_else_the_name_without_dlt() -> None:
    dead = letter()
    bare = DeadLetter("qm.captures.dlt", 0, 0, 0, None, b"", ())

    assert target_of(dead, "qm.elsewhere") == "qm.elsewhere"
    assert target_of(dead, None) == "qm.requests"
    assert target_of(bare, None) == "qm.captures"


async def test_pacer_spaces_sends_evenly_and_does_nothing_without_a_rate() -> None:
    clock = [100.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock[0] += seconds

    pacer = Pacer(4, clock=lambda: clock[0], sleep=sleep)
    for _ in range(3):
        await pacer.wait()
    clock[0] += 10  # an idle spell earns no burst
    await pacer.wait()
    await pacer.wait()

    assert slept == [0.25, 0.25, 0.25]
    unlimited = Pacer(None, sleep=sleep)
    await unlimited.wait()
    assert len(slept) == 3
    with pytest.raises(DltError):
        Pacer(0)


def test_summary_counts_by_error_class_and_keeps_the_age_range() -> None:
    summary = TopicSummary("qm.requests.dlt", 1)
    for dead in (
        letter(timestamp_ms=5, error=KeyError()),
        letter(timestamp_ms=2, error=KeyError()),
        letter(timestamp_ms=9),
    ):
        summary.add(dead)

    assert summary.records == 3
    assert dict(summary.by_error_class) == {"builtins.KeyError": 2, "InvalidMessage": 1}
    assert (summary.oldest_ms, summary.newest_ms) == (2, 9)


def test_offset_range_size_is_never_negative() -> None:
    assert OffsetRange(0, 3, 10).size == 7
    assert OffsetRange(0, 10, 3).size == 0


# --- what was removed, and what stays ---------------------------------------------------


def test_a_validation_message_keeps_its_field_path_and_every_word() -> None:
    class Start(BaseModel, extra="forbid"):
        site: str

    with pytest.raises(ValidationError) as caught:
        Start.model_validate({"site": "s", "password": CANARY})

    described = describe(caught.value)
    assert described == "password: Extra inputs are not permitted"
    assert CANARY not in described


def test_a_secret_object_is_replaced_by_a_marker_that_says_what_went() -> None:
    cleaned = redact(f'bad {{"storage_state": {{"cookies": ["{CANARY}"]}}, "site": "s"}}')
    assert cleaned == 'bad {"storage_state": [redacted: the rest of the message]'


def test_unexpected_errors_back_off_doubling_up_to_the_cap() -> None:
    assert [unexpected_delay(n, cap=1.0) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert unexpected_delay(10_000, cap=2.0) == 2.0


def test_a_replayed_copy_drops_the_outbox_id_and_keeps_null_and_duplicate_headers() -> None:
    original = (("dup", b"1"), ("dup", b"2"), ("null", None), (MESSAGE_ID, b"old-id"))
    copy = replay_headers(letter(headers=original))  # type: ignore[arg-type]
    assert copy == [("dup", b"1"), ("dup", b"2"), ("null", None),
                    (REPLAYED_FROM, b"qm.requests.dlt:0:0")]  # fmt: skip


def test_a_dead_letter_knows_the_one_it_was_replayed_from() -> None:
    child = letter(headers=((REPLAYED_FROM, b"qm.requests.dlt:2:17"),))
    assert child.parent == ("qm.requests.dlt", 2, 17)
    assert parse_coordinates("nonsense") is None
    assert parse_coordinates("a:b:c") is None
    assert header([("x", None)], "x") is None
