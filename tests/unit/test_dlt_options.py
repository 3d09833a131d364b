"""Every `qm dlt` option checks its own value: a bad one is one line on stderr and exit code 2.

The checks run before any connection is made, so these need no broker and no database (the
settings point at ports where nothing listens: a check that let a bad value through would end in
a connection error instead, and fail here).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.settings import get_settings

NOWHERE = {
    "QM_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
    "QM_DATABASE_URL": "postgresql+asyncpg://qm@127.0.0.1:9/none",
}

FILTERS = [
    (["--since", "1969-07-20T20:17Z"], "--since '1969-07-20T20:17Z' is before 1970-01-01"),
    (["--until", "1969-12-31T23:59:59Z"], "--until '1969-12-31T23:59:59Z' is before 1970-01-01"),
    (["--since", "99999999w"], "--since '99999999w' is before 1970-01-01"),
    (["--since", "1e400w"], "--since: cannot read the time"),
    (["--since", "soon"], "--since: cannot read the time 'soon'"),
    (["--since", "2h", "--until", "3h"], "--since is not before --until"),
    (["--partition", "-1"], "--partition must be from 0 to 2147483647, not -1"),
    (["--partition", "2147483648"], "--partition must be from 0 to 2147483647"),
    (["--partition", "one"], "--partition takes a whole number, not 'one'"),
    (["--from-offset", "-5"], "--from-offset must be from 0 to 9223372036854775807, not -5"),
    (["--to-offset", "9223372036854775808"], "--to-offset must be from 0 to"),
    (["--to-offset", "1.5"], "--to-offset takes a whole number"),
    (["--from-offset", "9", "--to-offset", "3"], "--from-offset is after --to-offset"),
    (["--error-class", " "], "--error-class is empty"),
]

REPLAY_ONLY = [
    (["--rate", "0"], "--rate must be above 0"),
    (["--rate", "-3"], "--rate must be above 0"),
    (["--rate", "nan"], "--rate must be above 0"),
    (["--rate", "inf"], "--rate must be above 0"),
    (["--rate", "fast"], "--rate takes a number of records a second, not 'fast'"),
    (["--to", "no such topic"], "--to 'no such topic' is not a Kafka topic name"),
]

SHOW_ONLY = [
    (["--limit", "0"], "--limit must be from 1 to"),
    (["--limit", "many"], "--limit takes a whole number"),
    (["--width", "3"], "--width must be from 10 to"),
]


def run(*args: str) -> tuple[int, list[str], str]:
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["dlt", *args], env=NOWHERE)
    finally:
        get_settings.cache_clear()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, result.output


@pytest.mark.parametrize(("args", "says"), FILTERS + REPLAY_ONLY)
def test_a_bad_replay_option_is_one_line_and_exit_code_2(args: list[str], says: str) -> None:
    code, lines, output = run("replay", "requests", *args)
    assert code == 2, output
    assert len(lines) == 1, output
    assert says in lines[0]
    assert "Traceback" not in output and "Usage" not in output


@pytest.mark.parametrize(("args", "says"), FILTERS + SHOW_ONLY)
def test_a_bad_show_option_is_one_line_and_exit_code_2(args: list[str], says: str) -> None:
    code, lines, output = run("show", "requests", *args)
    assert code == 2, output
    assert len(lines) == 1, output
    assert says in lines[0]
    assert "Traceback" not in output and "Usage" not in output
