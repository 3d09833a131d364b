"""Seed import rows: CSV or JSON lines read into (line, url, interval, priority), or a refusal
naming the line and the reason. Pure: the caller reads the file and loads the rows.

CSV: ``url[,interval_seconds[,priority]]``, an optional header row naming those columns.
JSON lines: ``{"url": …, "interval_seconds": …, "priority": …}`` (``interval`` also accepted).
Blank lines and lines starting with ``#`` are skipped; a URL repeated in the file is refused at
its later lines, so the first one counts.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["csv", "jsonl"]
MAX_URL = 4096
MAX_INT = 2**31 - 1
HEADER = ("url", "interval_seconds", "priority")
# http(s), optional user info, a host (name or bracketed IPv6), optional port, then path, query or
# fragment; no white space anywhere. A regular expression: urlsplit costs more than the whole
# rest of a row.
URL = re.compile(
    r"https?://(?:[^/?#\s@]*@)?(?:\[[0-9A-Fa-f:.]+\]|[^/?#@:\s\[\]]+)(?::[0-9]*)?(?:[/?#]\S*)?"
)


@dataclass(frozen=True)
class SeedRow:
    line: int
    url: str
    interval_seconds: int
    priority: int

    def record(self) -> tuple[int, str, int, int]:
        return (self.line, self.url, self.interval_seconds, self.priority)


@dataclass(frozen=True)
class Refused:
    line: int
    reason: str


def sniff_format(first_line: str) -> Format:
    """JSON lines when the first non-blank line is an object, CSV otherwise."""
    return "jsonl" if first_line.lstrip().startswith("{") else "csv"


def valid_seed_url(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError("no url")
    if len(url) > MAX_URL:
        raise ValueError(f"url longer than {MAX_URL} characters")
    if URL.fullmatch(url) is None:
        raise ValueError("not an http(s) URL with a host and no white space")
    return url


def _number(value: Any, name: str, default: int, *, positive: bool) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"{name} is not an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not an integer") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"{name} is not an integer")
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive")
    if abs(number) > MAX_INT:
        raise ValueError(f"{name} is out of range")
    return number


def _fields(fmt: Format, text: str) -> tuple[Any, Any, Any]:
    if fmt == "jsonl":
        try:
            body = json.loads(text)
        except ValueError:
            raise ValueError("not a JSON object") from None
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        unknown = set(body) - {"url", "interval_seconds", "interval", "priority"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        return (
            body.get("url"),
            body.get("interval_seconds", body.get("interval")),
            body.get("priority"),
        )
    cells = next(csv.reader([text])) if '"' in text else text.split(",")
    if len(cells) > 3:
        raise ValueError("more than 3 columns (url, interval_seconds, priority)")
    cells += [""] * (3 - len(cells))
    return cells[0].strip(), cells[1].strip(), cells[2].strip()


def parse_rows(
    lines: Iterable[str], fmt: Format, *, interval_seconds: int, priority: int
) -> Iterator[SeedRow | Refused]:
    """Each line of the input as a row or a refusal (lines count from 1, as an editor shows)."""
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        if fmt == "csv" and number == 1 and text.strip().lower().startswith("url"):
            continue  # the header row
        try:
            url, interval, prio = _fields(fmt, text)
            row = SeedRow(
                number,
                valid_seed_url(url),
                _number(interval, "interval_seconds", interval_seconds, positive=True),
                _number(prio, "priority", priority, positive=False),
            )
        except (ValueError, csv.Error) as exc:
            yield Refused(number, str(exc))
            continue
        first = seen.setdefault(row.url, number)
        if first != number:
            yield Refused(number, f"repeats the url of line {first}")
            continue
        yield row
