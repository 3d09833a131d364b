"""Domain rewrites as pure logic: matching, chains, cycles, and URLs kept intact."""

from __future__ import annotations

import pytest

from app.urls import (
    RewriteCycle,
    Rewrites,
    Rule,
    check_rules,
    describe_chain,
    normalize_host,
)


def rules(*pairs: tuple[str, str] | tuple[str, str, bool]) -> list[Rule]:
    out = []
    for n, pair in enumerate(pairs, start=1):
        source, target, *sub = pair
        out.append(Rule(n, source, target, bool(sub and sub[0])))
    return out


def test_a_chain_resolves_to_its_last_host_and_names_every_rule_it_used() -> None:
    chain = rules(("a.example", "b.example"), ("b.example", "c.example"))
    url, applied = Rewrites(chain).rewrite("https://a.example/x")
    assert url == "https://c.example/x"
    assert [rule.id for rule in applied] == [1, 2]
    assert describe_chain(chain, "a.example") == "a.example -> b.example -> c.example"


def test_port_path_query_fragment_and_user_info_are_kept_byte_for_byte() -> None:
    rewrites = Rewrites(rules(("old.example", "new.example")))
    url = "http://user:pw@old.example:8443/a%20b/c;p?q=1&r=%2F&&#frag?x"
    assert (
        rewrites.rewrite(url)[0] == "http://user:pw@new.example:8443/a%20b/c;p?q=1&r=%2F&&#frag?x"
    )
    assert rewrites.rewrite("https://old.example")[0] == "https://new.example"
    assert rewrites.rewrite("https://old.example?x")[0] == "https://new.example?x"


def test_hosts_match_case_insensitively_and_without_a_trailing_dot() -> None:
    rewrites = Rewrites(rules(("old.example", "new.example")))
    assert rewrites.rewrite("https://OLD.Example./p")[0] == "https://new.example/p"
    assert normalize_host("  Old.Example. ") == "old.example"


def test_a_subdomain_is_not_rewritten_by_its_parents_rule_unless_asked() -> None:
    plain = Rewrites(rules(("old.example", "new.example")))
    assert plain.rewrite("https://m.old.example/p") == ("https://m.old.example/p", ())
    moving = Rewrites(rules(("old.example", "new.example", True)))
    assert moving.rewrite("https://m.old.example/p")[0] == "https://m.new.example/p"
    assert moving.rewrite("https://old.example/p")[0] == "https://new.example/p"


def test_a_host_that_only_ends_like_the_rule_is_not_its_subdomain() -> None:
    moving = Rewrites(rules(("old.example", "new.example", True)))
    assert moving.rewrite("https://bold.example/")[1] == ()


def test_a_subdomains_own_rule_wins_over_its_parents() -> None:
    both = Rewrites(
        rules(("old.example", "new.example", True), ("m.old.example", "mobile.example"))
    )
    assert both.rewrite("https://m.old.example/")[0] == "https://mobile.example/"


def test_other_hosts_and_ipv6_literals_are_left_alone() -> None:
    rewrites = Rewrites(rules(("old.example", "new.example")))
    assert rewrites.rewrite("https://elsewhere.example/") == ("https://elsewhere.example/", ())
    assert rewrites.rewrite("http://[::1]:80/") == ("http://[::1]:80/", ())
    assert Rewrites([]).rewrite("https://old.example/") == ("https://old.example/", ())


@pytest.mark.parametrize(
    "cyclic",
    [
        [("a.example", "b.example"), ("b.example", "a.example")],
        [("a.example", "b.example"), ("b.example", "c.example"), ("c.example", "a.example")],
        [("a.example", "x.a.example", True)],
        [("a.example", "x.example", True), ("m.x.example", "m.a.example")],
    ],
    ids=["two", "three", "into-own-subdomain", "through-a-subdomain"],
)
def test_a_set_of_rules_with_a_cycle_is_refused(cyclic: list[tuple[str, str, bool]]) -> None:
    with pytest.raises(RewriteCycle, match="cycle"):
        check_rules(rules(*cyclic))


def test_chains_without_a_cycle_pass_the_check() -> None:
    check_rules(
        rules(("a.example", "b.example"), ("b.example", "c.example"), ("d.example", "c.example"))
    )


@pytest.mark.parametrize("bad", ["https://a.example", "a.example/x", "a.example:80", "", "a..b"])
def test_a_host_with_a_scheme_port_or_path_is_not_a_host(bad: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        normalize_host(bad)
