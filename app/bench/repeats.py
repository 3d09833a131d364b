"""A benchmark run ``--repeat N`` times: the median of every figure and its range.

A run's summary is a JSON object of numbers, possibly nested (CPU per process). The median
summary keeps those keys, each holding the median of the runs' values, plus ``ranges``: the same
keys, each holding ``[lowest, highest]``. A figure some runs could not measure (a max-rate search
that sustained no rate gives None) is the median of those that did, and ``missing`` says in how
many runs it was absent, so a median of two runs out of three is never taken for three.
Failures are added up, not a median: one failing run shows. Values that are not numbers are
taken from the last run that has them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SUMMED = frozenset({"failures"})  # counted over every run


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The runs' summaries in one: medians under the same keys, ``ranges`` beside them, and
    ``missing`` (how many runs lacked a figure) when any did."""
    missing: dict[str, int] = {}
    merged, ranges = _merge(runs, missing)
    merged["runs"] = len(runs)
    merged["ranges"] = ranges
    if missing:
        merged["missing"] = missing
    return merged


def _merge(
    runs: Sequence[Mapping[str, Any]], missing: dict[str, int], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    merged: dict[str, Any] = {}
    ranges: dict[str, Any] = {}
    keys = list(dict.fromkeys(key for run in runs for key in run))  # first seen, first shown
    for key in keys:
        values = [run[key] for run in runs if key in run and run[key] is not None]
        if values and all(isinstance(v, Mapping) for v in values):
            merged[key], ranges[key] = _merge(values, missing, f"{prefix}{key}.")
            continue
        if len(values) < len(runs):
            missing[prefix + key] = len(runs) - len(values)
        if values and all(_is_number(v) for v in values):
            merged[key] = _round(sum(values) if key in SUMMED else statistics.median(values))
            ranges[key] = [_round(min(values)), _round(max(values))]
        else:
            merged[key] = values[-1] if values else None
    return merged, ranges


def _round(value: float) -> float:
    return round(value, 3)


def lines(summary: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``figure: median (lowest to highest)``, a line each, for the table's reader."""
    out: list[str] = []
    ranges = summary.get("ranges", {})
    for key, value in summary.items():
        if key in ("ranges", "runs", "missing"):
            continue
        span = ranges.get(key) if isinstance(ranges, Mapping) else None
        if isinstance(value, Mapping):
            nested = dict(value)
            if isinstance(span, Mapping):
                nested["ranges"] = span
            out += lines(nested, f"{prefix}{key}.")
        elif span:
            absent = summary.get("missing", {}).get(key)
            note = f", missing in {absent} runs" if absent else ""
            out.append(f"{prefix}{key}: {value:g} ({span[0]:g} to {span[1]:g}{note})")
        elif value is not None:
            out.append(f"{prefix}{key}: {value}")
    return out
