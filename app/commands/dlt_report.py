"""What `qm dlt replay` answers: the plan of a dry run or the report of a run, as text or JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.markup import escape

from app.commands.common import out
from app.commands.common import table as fold_table
from app.dlt import redact_bytes
from app.dlt.replay import ReplayReport

DRY_RUN_ROWS = 200


def when(ms: int | None) -> str:
    """A record's timestamp in UTC, to the second."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def report_json(report: ReplayReport) -> dict[str, Any]:
    """The report as one JSON object; a dry run's plan names every record it would send."""
    document: dict[str, Any] = {
        "topic": report.topic,
        "dry_run": report.dry_run,
        "selected": report.selected,
        "replayed": report.replayed,
        "already_replayed": report.already_replayed,
        "failed_again": report.failed_again,
        "raced": report.raced,
        "targets": dict(report.targets.most_common()),
        "not_rearmed": [
            {"capture_id": left.capture_id, "status": left.status, "reason": left.reason}
            for left in report.not_rearmed
        ],
    }
    if report.dry_run:
        document["planned"] = [
            {
                "partition": letter.partition,
                "offset": letter.offset,
                "timestamp": when(letter.timestamp_ms),
                "key": redact_bytes(letter.key, 60),
                "error_class": letter.error_class,
                "to": target,
            }
            for letter, target in report.planned
        ]
    return document


def print_report(report: ReplayReport) -> None:
    """The plan of a dry run, or what a run sent and skipped, as a table and summary lines."""
    screen = out()
    if report.selected == 0:
        screen.print("nothing selected")
        return
    if report.dry_run:
        _print_dry_run(report)
        return
    if report.replayed:
        targets = ", ".join(f"{escape(t)} ({n})" for t, n in report.targets.most_common())
        sent = f"[green]{report.replayed} replayed[/] to {targets}"
    else:
        sent = "0 replayed"
    again_note = (
        f" ({report.failed_again} of them copies that failed again; --again sends them)"
        if report.failed_again
        else ""
    )
    screen.print(
        f"{report.selected} selected, {sent}, "
        f"{report.already_replayed} skipped as already replayed{again_note}"
        f"{_not_rearmed(report, 'not')}",
        highlight=False,
    )
    _print_not_rearmed(report)
    if report.already_replayed == report.selected:
        screen.print("every selected record was replayed before; --again replays them anyway")
    if report.raced:
        screen.print(
            f"[yellow]{report.raced} of them were also replayed by another run meanwhile "
            "(harmless: requests are idempotent)[/]"
        )


def _print_dry_run(report: ReplayReport) -> None:
    screen = out()
    table = fold_table(
        "partition:offset", "timestamp", "key", "error class", "to", title="would replay"
    )
    for letter, target in report.planned[:DRY_RUN_ROWS]:
        table.add_row(
            f"{letter.partition}:{letter.offset}",
            when(letter.timestamp_ms),
            escape(redact_bytes(letter.key, 60) or "-"),
            escape(letter.error_class or "-"),
            escape(target),
        )
    screen.print(table)
    if len(report.planned) > DRY_RUN_ROWS:
        screen.print(f"… and {len(report.planned) - DRY_RUN_ROWS} more")
    screen.print(
        f"dry run: {report.selected} selected, {len(report.planned)} would be replayed, "
        f"{report.already_replayed} skipped as already replayed"
        f"{_not_rearmed(report, 'would not be')}; nothing was sent",
        highlight=False,
    )
    _print_not_rearmed(report)


def _not_rearmed(report: ReplayReport, verb: str) -> str:
    """The summary's part for failed captures' dead letters left alone."""
    count = len(report.not_rearmed)
    return f", {count} {verb} replayed (their capture is not FAILED)" if count else ""


def _print_not_rearmed(report: ReplayReport) -> None:
    """Why each failed capture's dead letter was left alone (the first ``DRY_RUN_ROWS``)."""
    for left in report.not_rearmed[:DRY_RUN_ROWS]:
        out().print(f"[yellow]{escape(left.reason)}[/]", soft_wrap=True)
    if len(report.not_rearmed) > DRY_RUN_ROWS:
        out().print(f"… and {len(report.not_rearmed) - DRY_RUN_ROWS} more")
