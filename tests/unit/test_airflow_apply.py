"""The apply functions Airflow's Kafka triggers call: what matches, and that nothing raises."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.airflow import MESSAGE_ID_HEADER, SeenMessages, capture_ready, job_finished
from app.outbox.writer import MESSAGE_ID
from tests.support.airflow import ROOT


class Message:
    """The part of confluent-kafka's ``Message`` the apply functions use."""

    def __init__(self, value: bytes | None) -> None:
        self._value = value

    def value(self) -> bytes | None:
        return self._value


def message(record: Any) -> Message:
    return Message(json.dumps(record).encode())


def terminal(job_id: str, type_: str, status: str) -> dict[str, Any]:
    return {
        "type": type_,
        "v": 1,
        "job_id": job_id,
        "site": "board",
        "collector": "c1",
        "status": status,
        "finished_at": "2026-01-01T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("type_", "status", "outcome"),
    [
        ("job.succeeded", "SUCCEEDED", "succeeded"),
        ("job.failed", "FAILED", "failed"),
        ("job.cancelled", "CANCELLED", "cancelled"),
        ("job.expired", "EXPIRED", "expired"),
        ("job.timed_out", "TIMED_OUT", "timed_out"),
    ],
)
def test_job_finished_returns_the_outcome_of_the_awaited_job(
    type_: str, status: str, outcome: str
) -> None:
    event = job_finished(message(terminal("j1", type_, status)), job_id="j1")
    assert event == {
        "job_id": "j1",
        "outcome": outcome,
        "succeeded": outcome == "succeeded",
        "status": status,
        "site": "board",
        "collector": "c1",
        "finished_at": "2026-01-01T00:00:00Z",
    }


def test_job_finished_ignores_other_jobs_and_other_event_types() -> None:
    assert job_finished(message(terminal("j2", "job.succeeded", "SUCCEEDED")), job_id="j1") is None
    assert job_finished(message(terminal("j1", "job.granted", "RUNNING")), job_id="j1") is None
    assert job_finished(message(terminal("j1", "job.succeeded", "SUCCEEDED"))) is None


def capture(**fields: Any) -> dict[str, Any]:
    return {
        "type": "capture.ready",
        "v": 1,
        "capture_id": "c1",
        "job_id": "j1",
        "site": "board",
        "url": "https://board.example.com/a/1",
        "storage_uri": "s3://bucket/c1",
        "sha256": "ab" * 32,
        "content_type": "text/html; charset=utf-8",
        "size": 10,
        "captured_at": "2026-01-01T00:00:00Z",
        "handed_off_at": "2026-01-01T00:00:01Z",
        **fields,
    }


def test_capture_ready_returns_the_capture_fields_for_the_dag() -> None:
    record = capture(meta={"page": 2})
    assert capture_ready(message(record), site="board") == {
        k: v for k, v in record.items() if k not in ("type", "v")
    }


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        ({}, True),
        ({"site": "forum"}, False),
        ({"content_type": "text/html"}, True),
        ({"content_type": "TEXT/HTML"}, True),
        ({"content_type": "image/png"}, False),
        ({"url_prefix": "https://board.example.com/a/"}, True),
        ({"url_prefix": "https://board.example.com/b/"}, False),
        ({"job_id": "j1"}, True),
        ({"job_id": "j2"}, False),
    ],
)
def test_capture_ready_filters(filters: dict[str, str], matches: bool) -> None:
    assert (
        capture_ready(message(capture()), **{"site": "board", **filters}) is not None
    ) is matches


def test_capture_ready_ignores_other_types_and_records_without_an_id() -> None:
    assert capture_ready(message(capture(type="capture.accepted")), site="board") is None
    assert capture_ready(message(capture(capture_id="")), site="board") is None
    assert capture_ready(message(capture(capture_id=7)), site="board") is None


MALFORMED: list[bytes | None] = [None, b"", b"\xff\xfe", b"not json", b"[1]", b"null", b"3", b'"x"']


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_records_match_nothing(value: bytes | None) -> None:
    assert job_finished(Message(value), job_id="j1") is None
    assert capture_ready(Message(value), site="board") is None


def test_a_message_without_value_matches_nothing() -> None:
    class Broken:
        def value(self) -> bytes:
            raise RuntimeError("broken client")

    assert job_finished(Broken(), job_id="j1") is None
    assert capture_ready(object(), site="board") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(["type", "job_id", "capture_id", "site", "url", "content_type", "v"])


@given(
    st.dictionaries(fields, json_values, max_size=7) | json_values | st.binary(max_size=64),
)
def test_no_record_makes_an_apply_function_raise(record: Any) -> None:
    value = record if isinstance(record, bytes) else json.dumps(record).encode()
    job_finished(Message(value), job_id="j1")
    capture_ready(Message(value), site="board", content_type="text/html", url_prefix="https://")


def test_the_apply_functions_import_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import app.airflow; "
        "print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = {name.split(".")[0] for name in done.stdout.split()}
    ours = {name for name in done.stdout.split() if name.split(".")[0] in ("app", "schemas")}
    assert ours == {"app", "app.airflow"}
    assert loaded - {"app"} <= set(sys.stdlib_module_names)


class Published:
    """A ``capture.ready`` record as the trigger reads it: its value, headers and place."""

    def __init__(self, record: dict[str, Any], message_id: bytes | None, offset: int) -> None:
        self._value = json.dumps(record).encode()
        self._headers = [] if message_id is None else [("qm.message_id", message_id)]
        self._where = ("qm.captures.ready", 0, offset)

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return [("qm.event", b"capture.ready"), *self._headers]

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


def fresh_id() -> bytes:
    return uuid.uuid4().hex.encode()


def test_a_copy_the_relay_published_again_fires_nothing() -> None:
    first, other = fresh_id(), fresh_id()
    record = capture(capture_id=first.decode())
    assert capture_ready(Published(record, first, offset=10), site="board") is not None
    # the relay's copy: the same message id at a later offset, after another capture
    assert capture_ready(Published(capture(), other, offset=11), site="board") is not None
    assert capture_ready(Published(record, first, offset=12), site="board") is None
    assert capture_ready(Published(record, first, offset=13), site="board") is None


def test_every_watcher_fires_once_for_a_record_only_the_copy_is_dropped() -> None:
    # two watchers (consumer groups) in one triggerer read the same records at the same places
    mid = fresh_id()
    record = capture(capture_id=mid.decode())
    for _ in ("html watcher", "board watcher"):
        assert capture_ready(Published(record, mid, offset=5), site="board") is not None
    assert capture_ready(Published(record, mid, offset=9), site="board") is None


def test_records_without_a_readable_message_id_are_never_taken_for_copies() -> None:
    record = capture()
    for offset in (1, 2):
        assert capture_ready(Published(record, None, offset=offset), site="board") is not None
        assert capture_ready(Published(record, b"\xff\xfe", offset=offset), site="board")


def test_a_record_that_did_not_match_is_not_remembered() -> None:
    mid = fresh_id()
    record = capture(content_type="image/png")
    assert capture_ready(Published(record, mid, 1), site="board", content_type="text/html") is None
    assert capture_ready(Published(record, mid, 1), site="board") is not None


def test_the_memory_of_seen_messages_is_bounded_and_forgets_the_least_recently_seen() -> None:
    seen = SeenMessages(capacity=3)
    for n in range(3):
        assert seen.first(f"m{n}", ("t", 0, n))
    assert not seen.first("m0", ("t", 0, 99))  # a copy; m0 is now the most recently seen
    assert seen.first("m3", ("t", 0, 3))  # m1 goes
    assert seen.first("m1", ("t", 0, 98))
    assert not seen.first("m0", ("t", 0, 97))
    # a message that does not say where it was read: any repeat of its id is a copy
    assert seen.first("m9", None)
    assert not seen.first("m9", None)


def test_the_header_is_the_one_the_outbox_stamps() -> None:
    assert MESSAGE_ID_HEADER == MESSAGE_ID
