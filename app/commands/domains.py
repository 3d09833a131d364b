"""`qm domains …`: the host moves of a site, applied to every URL handed out."""

from __future__ import annotations

from typing import Annotated

import typer

from app.commands.common import fail, in_transaction, out, print_json_lines
from app.commands.common import table as fold_table
from app.store import Conn, Row, domains
from app.urls import describe_chain

domains_app = typer.Typer(
    help="Domain rewrites: when a site moves hosts, the URLs handed out follow (chains resolve)."
)


@domains_app.command("add")
def domains_add(
    site: str,
    from_host: str,
    to_host: str,
    subdomains: Annotated[
        bool, typer.Option("--subdomains", help="Also move the subdomains of FROM_HOST")
    ] = False,
) -> None:
    """Rewrite FROM_HOST to TO_HOST in the URLs of SITE from now on (a cycle is refused)."""

    async def work(conn: Conn) -> str:
        row = await domains.add_rewrite(
            conn, site=site, from_host=from_host, to_host=to_host, subdomains=subdomains
        )
        rules = await domains.site_rules(conn, site)
        return describe_chain(rules, row["from_host"])

    try:
        chain = in_transaction(work)
    except ValueError as exc:  # RewriteRefused, or a host that is not a host name
        raise fail(str(exc)) from None
    out().print(f"[green]{site}: {chain}[/]")


@domains_app.command("list")
def domains_list(
    site: str,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines (one rewrite a line).")
    ] = False,
) -> None:
    """A site's rewrites, each with its resolved chain and how many handed-out URLs it changed."""

    async def work(conn: Conn) -> list[tuple[str, ...]]:
        rows = await domains.list_rewrites(conn, site)
        rules = await domains.site_rules(conn, site)
        return [
            (
                row["from_host"],
                row["to_host"],
                "yes" if row["subdomains"] else "no",
                describe_chain(rules, row["from_host"]),
                row["since"].isoformat(timespec="seconds"),
                str(row["urls_rewritten"]),
            )
            for row in rows
        ]

    columns = ("from", "to", "subdomains", "resolves to", "since", "URLs rewritten")
    rows = in_transaction(work)
    if as_json:
        keys = [column.replace(" ", "_").lower() for column in columns]
        print_json_lines(dict(zip(keys, cells, strict=True)) for cells in rows)
        return
    table = fold_table(*columns)
    for cells in rows:
        table.add_row(*cells)
    out().print(table)


@domains_app.command("remove")
def domains_remove(
    site: str,
    from_host: str,
    to_host: Annotated[str | None, typer.Argument(help="If given, must match the rule")] = None,
) -> None:
    """Stop rewriting FROM_HOST for SITE."""

    async def work(conn: Conn) -> Row | None:
        row = await domains.remove_rewrite(conn, site=site, from_host=from_host)
        if row is not None and to_host is not None and row["to_host"] != to_host.lower():
            raise ValueError(
                f"{site} rewrites {row['from_host']} to {row['to_host']}, not {to_host}"
            )
        return row

    try:
        row = in_transaction(work)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if row is None:
        raise fail(f"{site} has no rewrite for {from_host}")
    out().print(f"{site}: {row['from_host']} is no longer rewritten")
