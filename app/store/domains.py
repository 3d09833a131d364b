"""Domain rewrites: ``from_host -> to_host`` per site, applied to every URL Quartermaster hands out.

The rules themselves (matching, chains, cycles) are pure logic in ``app.urls``; this module
stores them and records which rule changed how many handed-out URLs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.store.rows import Row
from app.urls import RewriteCycle, Rewrites, Rule, check_rules, normalize_host


class RewriteRefused(ValueError):
    """A rule that cannot be added: its site is unknown, its host has a rule, or it makes a cycle."""


async def site_rules(conn: AsyncConnection, site: str) -> list[Rule]:
    """Every rule of a site."""
    result = await conn.execute(
        text(
            "SELECT id, from_host, to_host, subdomains FROM domain_rewrites "
            "WHERE site = :site ORDER BY id"
        ),
        {"site": site},
    )
    return [Rule(row.id, row.from_host, row.to_host, row.subdomains) for row in result]


async def add_rewrite(
    conn: AsyncConnection, *, site: str, from_host: str, to_host: str, subdomains: bool = False
) -> Row:
    """A new rule of a site, effective now; RewriteRefused with the reason when it cannot be.

    The site's row is locked first, so two rules added at once cannot make a cycle together.
    Hosts are normalised (lower case, no trailing dot); ValueError for one that is not a host.
    """
    source, target = normalize_host(from_host), normalize_host(to_host)
    if source == target:
        raise RewriteRefused(f"{source} would be rewritten to itself")
    locked = await conn.execute(
        text("SELECT slug FROM sites WHERE slug = :site FOR UPDATE"), {"site": site}
    )
    if locked.first() is None:
        raise RewriteRefused(f"no site {site!r}")
    rules = await site_rules(conn, site)
    if any(rule.from_host == source for rule in rules):
        raise RewriteRefused(f"{site} already rewrites {source}; remove that rule first")
    try:
        check_rules([*rules, Rule(0, source, target, subdomains)])
    except RewriteCycle as exc:
        raise RewriteRefused(str(exc)) from None
    result = await conn.execute(
        text(
            """
            INSERT INTO domain_rewrites (site, from_host, to_host, subdomains)
            VALUES (:site, :source, :target, :subdomains)
            RETURNING *
            """
        ),
        {"site": site, "source": source, "target": target, "subdomains": subdomains},
    )
    return result.mappings().one()


async def remove_rewrite(conn: AsyncConnection, *, site: str, from_host: str) -> Row | None:
    """Delete a site's rule for ``from_host``; None when there is none."""
    result = await conn.execute(
        text("DELETE FROM domain_rewrites WHERE site = :site AND from_host = :source RETURNING *"),
        {"site": site, "source": from_host.strip().lower().rstrip(".")},
    )
    return result.mappings().first()


async def list_rewrites(conn: AsyncConnection, site: str) -> list[Row]:
    """A site's rules with how many handed-out URLs each changed."""
    result = await conn.execute(
        text(
            """
            SELECT r.*, coalesce(sum(u.urls), 0)::bigint AS urls_rewritten
            FROM domain_rewrites r LEFT JOIN domain_rewrite_uses u ON u.rewrite_id = r.id
            WHERE r.site = :site GROUP BY r.id ORDER BY r.from_host
            """
        ),
        {"site": site},
    )
    return list(result.mappings())


@dataclass(frozen=True)
class Rewritten:
    """URLs as they are handed out, and how many of them each rule changed (not yet recorded)."""

    urls: list[str]
    uses: Counter[int] = field(default_factory=Counter)


async def plan_rewrites(conn: AsyncConnection, site: str, urls: Sequence[str]) -> Rewritten:
    """``urls`` of a site with each host resolved through the site's rules; nothing recorded.

    A URL whose chain would loop is handed out as it is (adding a rule checks for cycles, so only
    rules written around that check can loop).
    """
    rules = await site_rules(conn, site) if urls else []
    if not rules:
        return Rewritten(list(urls))
    rewrites = Rewrites(rules)
    rewritten = Rewritten([])
    for url in urls:
        try:
            new, applied = rewrites.rewrite(url)
        except RewriteCycle:
            new, applied = url, ()
        rewritten.uses.update(rule.id for rule in applied)
        rewritten.urls.append(new)
    return rewritten


async def record_uses(conn: AsyncConnection, rewritten: Rewritten) -> None:
    """Count, in this transaction, the URLs each rule changed (every rule of a chain counts)."""
    if rewritten.uses:
        await conn.execute(
            text(
                "INSERT INTO domain_rewrite_uses (rewrite_id, urls) "
                "SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:counts AS integer[]))"
            ),
            {"ids": list(rewritten.uses), "counts": list(rewritten.uses.values())},
        )


async def rewrite_urls(conn: AsyncConnection, site: str, urls: Sequence[str]) -> list[str]:
    """``urls`` of a site as they are handed out (``plan_rewrites``), their rule uses recorded."""
    rewritten = await plan_rewrites(conn, site, urls)
    await record_uses(conn, rewritten)
    return rewritten.urls
