"""Domain rewrites against the real database, and `qm domains` as an operator runs it."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import domains
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import make_site, scalar


async def test_a_chain_rewrites_handed_out_urls_and_each_rule_counts_what_it_changed(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)
    async with engine.begin() as conn:
        await domains.add_rewrite(conn, site="board", from_host="A.example", to_host="b.example")
        await domains.add_rewrite(conn, site="board", from_host="b.example", to_host="c.example")
    async with engine.begin() as conn:
        out = await domains.rewrite_urls(
            conn,
            "board",
            ["https://a.example:81/p?q#f", "https://b.example/", "https://other.example/"],
        )
        assert await domains.rewrite_urls(conn, "board", ["http://A.EXAMPLE"]) == [
            "http://c.example"
        ]
    assert out == ["https://c.example:81/p?q#f", "https://c.example/", "https://other.example/"]
    async with engine.connect() as conn:
        counts = {
            r["from_host"]: r["urls_rewritten"] for r in await domains.list_rewrites(conn, "board")
        }
    assert counts == {"a.example": 2, "b.example": 3}


async def test_a_rule_that_closes_a_cycle_is_refused_and_nothing_is_written(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)
    async with engine.begin() as conn:
        await domains.add_rewrite(conn, site="board", from_host="a.example", to_host="b.example")
        await domains.add_rewrite(conn, site="board", from_host="b.example", to_host="c.example")
    with pytest.raises(domains.RewriteRefused, match="cycle"):
        async with engine.begin() as conn:
            await domains.add_rewrite(
                conn, site="board", from_host="c.example", to_host="a.example"
            )
    assert await scalar(engine, "SELECT count(*) FROM domain_rewrites") == 2


async def test_two_rules_added_at_once_cannot_make_a_cycle_together(
    engine: AsyncEngine, settings: Settings
) -> None:
    await make_site(engine, settings, n_accounts=0)

    async def add(source: str, target: str) -> bool:
        try:
            async with engine.begin() as conn:
                await domains.add_rewrite(conn, site="board", from_host=source, to_host=target)
        except domains.RewriteRefused:
            return False
        return True

    outcomes = await asyncio.gather(add("a.example", "b.example"), add("b.example", "a.example"))
    assert sorted(outcomes) == [False, True]
    assert await scalar(engine, "SELECT count(*) FROM domain_rewrites") == 1


async def test_qm_domains_add_list_and_remove_show_the_resolved_chain(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings, n_accounts=0)
    assert (await qm("domains", "add", "board", "a.example", "b.example")).exit_code == 0
    added = await qm("domains", "add", "board", "b.example", "c.example", "--subdomains")
    assert added.exit_code == 0, added.output
    assert "b.example -> c.example" in added.stdout
    listed = await qm("domains", "list", "board")
    assert listed.exit_code == 0, listed.output
    assert "a.example -> b.example -> c.example" in listed.stdout
    removed = await qm("domains", "remove", "board", "a.example", "b.example")
    assert removed.exit_code == 0, removed.output
    assert await scalar(engine, "SELECT count(*) FROM domain_rewrites") == 1


async def test_qm_domains_refuses_a_cycle_a_bad_host_and_an_unknown_site_in_one_line(
    engine: AsyncEngine, settings: Settings, qm: Qm
) -> None:
    await make_site(engine, settings, n_accounts=0)
    await qm("domains", "add", "board", "a.example", "b.example")
    assert_one_red_line(await qm("domains", "add", "board", "b.example", "a.example"), "cycle")
    assert_one_red_line(
        await qm("domains", "add", "board", "https://x.example/", "y.example"), "not a host name"
    )
    assert_one_red_line(await qm("domains", "add", "nowhere", "x.example", "y.example"), "no site")
    assert_one_red_line(await qm("domains", "remove", "board", "zzz.example"), "no rewrite")
    assert await scalar(engine, "SELECT count(*) FROM domain_rewrites") == 1
