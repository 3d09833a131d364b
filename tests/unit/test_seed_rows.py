"""Seed import rows: CSV and JSON lines, defaults, and refusals by line number."""

from __future__ import annotations

from app.seed_files import Refused, SeedRow, parse_rows, sniff_format


def parse(text: str) -> list[SeedRow | Refused]:
    lines = text.splitlines(keepends=True)
    fmt = sniff_format(next((line for line in lines if line.strip()), ""))
    return list(parse_rows(lines, fmt, interval_seconds=3600, priority=0))


def test_csv_rows_with_a_header_take_defaults_for_missing_columns() -> None:
    rows = parse(
        "url,interval_seconds,priority\n"
        "https://a.example/1,60,5\n"
        "https://a.example/2?x=1,y\n"
        "\n"
        "# a comment\n"
        '"https://a.example/3,with,commas",,-2\n'
    )
    assert rows[0] == SeedRow(2, "https://a.example/1", 60, 5)
    assert rows[1] == Refused(3, "interval_seconds is not an integer")
    assert rows[2] == SeedRow(6, "https://a.example/3,with,commas", 3600, -2)


def test_json_lines_are_read_and_bad_ones_refused_by_line() -> None:
    rows = parse(
        '{"url": "https://a.example/1", "interval": 30}\n'
        "{not json\n"
        '{"url": "ftp://a.example/2"}\n'
        '{"url": "https://a.example/3", "colour": "red"}\n'
        '{"url": "https://a.example/4", "interval_seconds": 0}\n'
        '{"url": "https://a.example/1"}\n'
        '["https://a.example/5"]\n'
    )
    assert rows == [
        SeedRow(1, "https://a.example/1", 30, 0),
        Refused(2, "not a JSON object"),
        Refused(3, "not an http(s) URL with a host and no white space"),
        Refused(4, "unknown field 'colour'"),
        Refused(5, "interval_seconds must be positive"),
        Refused(6, "repeats the url of line 1"),
        Refused(7, "not a JSON object"),
    ]


def test_a_url_too_long_or_without_host_and_too_many_columns_are_refused() -> None:
    rows = parse(f"https://a.example/{'x' * 5000}\nhttps:///path\nhttps://a.example/,1,2,3\n")
    assert [r.reason for r in rows if isinstance(r, Refused)] == [
        "url longer than 4096 characters",
        "not an http(s) URL with a host and no white space",
        "more than 3 columns (url, interval_seconds, priority)",
    ]
