"""How a run of the audit is told: each violation as found, then the summary table."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app.audit.checker import VIOLATION_KINDS, Summary, Violation

SHOWN_UNREADABLE = 20


def violation_line(violation: Violation) -> str:
    """One line: the kind, its subject, what broke, and the events that prove it."""
    proof = ", ".join(str(p) for p in violation.positions)
    return f"VIOLATION {violation.kind} {violation.subject}: {violation.detail} [events: {proof}]"


def print_violation(console: Console, violation: Violation) -> None:
    console.print(f"[red]{escape(violation_line(violation))}[/]", soft_wrap=True)


def print_summary(console: Console, summary: Summary) -> None:
    """The summary table, then the events that could not be read, named."""
    table = Table(title="qm audit leases", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    facts = summary.facts
    rows: list[tuple[str, int]] = [
        ("events read", summary.events),
        ("lease grants", facts["job.granted"]),
        ("lease extensions", facts["job.extended"]),
        ("lease ends", sum(n for t, n in facts.items() if t.startswith("job.")) -
         facts["job.granted"] - facts["job.extended"]),
        ("seed hand-outs", facts["seed.assigned"]),
        ("capture hand-offs", facts["capture.handed_off"]),
        ("events of no lease", summary.ignored),
        ("unreadable events", summary.unreadable),
        ("duplicates (published twice)", summary.duplicates),
        ("ends before the window", summary.before_window),
        ("late (past the reorder window)", summary.late),
        ("leases live at the end", summary.live_at_end),
    ]  # fmt: skip
    for what, count in rows:
        table.add_row(what, str(count))
    for kind in VIOLATION_KINDS:
        count = summary.violations[kind]
        table.add_row(f"violations: {kind}", f"[red]{count}[/]" if count else "0")
    console.print(table)
    if summary.first_at is not None:
        as_json = summary.as_json()
        console.print(f"database time {as_json['from']} to {as_json['to']}")
    for position, why in summary.unreadable_examples[:SHOWN_UNREADABLE]:
        console.print(f"[yellow]unreadable {escape(str(position))}: {escape(why)}[/]")
    more = summary.unreadable - min(len(summary.unreadable_examples), SHOWN_UNREADABLE)
    if more > 0:
        console.print(f"[yellow]and {more} more unreadable events (--json names the first 100)[/]")
    total = sum(summary.violations.values())
    verdict = f"[red]{total} violations[/]" if total else "[green]no violations[/]"
    console.print(verdict)
