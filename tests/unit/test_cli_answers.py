"""How `qm` words a failure: unreachable only when unreachable, never the SQL, a bug stays a bug."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.errors import KafkaConnectionError
from sqlalchemy.exc import DBAPIError

from app.commands.common import relative, span
from app.commands.failures import explain
from app.settings import get_settings


class ServerError(Exception):
    """Stands in for the driver's error: a SQLSTATE and the server's message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def database_error(sqlstate: str, message: str) -> DBAPIError:
    return DBAPIError(
        "UPDATE sites SET capacity = $1", {"capacity": 0}, ServerError(sqlstate, message)
    )


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "QM_DATABASE_URL",
        "DATABASE_URL",
        "QM_KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_BOOTSTRAP_SERVERS",
    ):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()


def test_a_refused_change_names_the_servers_reason_without_the_statement() -> None:
    line = explain(database_error("23514", 'violates check constraint "sites_capacity_check"'))
    assert (
        line == 'the database refused the change: violates check constraint "sites_capacity_check"'
    )


def test_a_failed_login_is_unreachable_and_hints_at_the_dev_env_file() -> None:
    line = explain(database_error("28P01", "password authentication failed for user qm"))
    assert line is not None
    assert line.startswith("the database at 127.0.0.1:5432/quartermaster cannot be reached")
    assert ".qm-dev.env" in line and "UPDATE" not in line


def test_a_missing_table_says_to_migrate() -> None:
    line = explain(database_error("42P01", 'relation "sites" does not exist'))
    assert line is not None and line.endswith("run `qm migrate`")


def test_a_broker_error_names_the_broker() -> None:
    line = explain(KafkaConnectionError())
    assert line is not None and line.startswith(
        "the Kafka broker at 127.0.0.1:9092 cannot be reached"
    )


def test_an_os_error_outside_the_drivers_is_not_called_unreachable() -> None:
    line = explain(PermissionError(13, "Permission denied", "/etc/contract"))
    assert line == "Permission denied: /etc/contract"


def test_an_error_no_operator_can_fix_keeps_its_traceback() -> None:
    assert explain(KeyError("bug")) is None


def test_durations_read_in_their_two_largest_units() -> None:
    assert [span(s) for s in (5, 299, 7380, 2 * 86400 + 3 * 3600)] == [
        "5s",
        "4m59s",
        "2h03m",
        "2d03h",
    ]


def test_relative_times_say_ago_or_in() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert relative(now - timedelta(seconds=90), now) == "1m30s ago"
    assert relative(now + timedelta(hours=2), now) == "in 2h00m"
    assert relative(None, now) == ""
