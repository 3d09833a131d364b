"""Domain rewrites of a site: host matching, chain resolution and cycle detection (pure logic).

A rule moves one host to another (``from_host -> to_host``); with ``subdomains`` it also moves
every subdomain of ``from_host`` (``m.old.example -> m.new.example``). Rules chain: ``a -> b`` and
``b -> c`` turn ``a`` into ``c``. A set of rules in which some chain would apply a rule twice is a
cycle and is refused. Hosts match case-insensitively and without a trailing dot; a URL keeps its
scheme, user info, port, path, query and fragment exactly as they were.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

HOST = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


class RewriteCycle(ValueError):
    """A set of rules in which a chain comes back to a rule it already applied."""


def normalize_host(host: str) -> str:
    """A host as rules compare it: lower case, no trailing dot; ValueError if it is not a host name."""
    name = host.strip().lower().rstrip(".")
    if not HOST.match(name):
        raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
    return name


@dataclass(frozen=True)
class Rule:
    """``from_host -> to_host`` of one site; ``subdomains``: its subdomains move along."""

    id: int
    from_host: str
    to_host: str
    subdomains: bool = False

    def apply(self, host: str) -> str | None:
        """The host this rule makes of ``host``, or None when it does not match."""
        if host == self.from_host:
            return self.to_host
        if self.subdomains and host.endswith("." + self.from_host):
            return host[: -len(self.from_host)] + self.to_host
        return None


@dataclass(frozen=True)
class Resolved:
    """Where a host ends up and the rules that took it there, in order."""

    host: str
    rules: tuple[Rule, ...]


class Rewrites:
    """The rules of one site; ``resolve`` follows a host's chain to its end."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.exact: dict[str, Rule] = {}
        self.parents: dict[str, Rule] = {}
        for rule in rules:
            self.exact[rule.from_host] = rule
            if rule.subdomains:
                self.parents[rule.from_host] = rule

    def __bool__(self) -> bool:
        return bool(self.exact)

    def _match(self, host: str) -> Rule | None:
        """The rule for ``host``: its own rule first, else the nearest parent's subdomain rule."""
        rule = self.exact.get(host)
        if rule is not None:
            return rule
        labels = host.split(".")
        for start in range(1, len(labels)):
            rule = self.parents.get(".".join(labels[start:]))
            if rule is not None:
                return rule
        return None

    def resolve(self, host: str) -> Resolved:
        """Follow the chain from ``host``; RewriteCycle when it would apply a rule twice."""
        current = host.lower().rstrip(".")
        applied: list[Rule] = []
        while (rule := self._match(current)) is not None:
            if rule in applied:
                chain = " -> ".join([host, *(r.to_host for r in applied)])
                raise RewriteCycle(f"rewrites form a cycle: {chain} -> {rule.apply(current)}")
            applied.append(rule)
            new = rule.apply(current)
            assert new is not None
            current = new
        return Resolved(current, tuple(applied))

    def rewrite(self, url: str) -> tuple[str, tuple[Rule, ...]]:
        """``url`` with its host resolved, everything else kept byte for byte; the rules applied."""
        if not self:
            return url, ()
        host, start, end = _host_span(url)
        if host is None:
            return url, ()
        resolved = self.resolve(host)
        if not resolved.rules:
            return url, ()
        return url[:start] + resolved.host + url[end:], resolved.rules


def _host_span(url: str) -> tuple[str | None, int, int]:
    """The host of an http(s) URL and where it sits in the string (None for no plain host name)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None, 0, 0
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None, 0, 0
    netloc_start = url.find("//") + 2
    netloc = url[netloc_start : netloc_start + len(parts.netloc)]
    host_start = netloc.rfind("@") + 1
    host_part = netloc[host_start:]
    if host_part.startswith("["):
        return None, 0, 0  # an IPv6 literal: no rule names one
    host = host_part.split(":", 1)[0]
    start = netloc_start + host_start
    return host.lower().rstrip("."), start, start + len(host)


def check_rules(rules: Sequence[Rule]) -> None:
    """RewriteCycle if a chain of ``rules`` applies a rule twice.

    Probes every rule's own host, a subdomain of each subdomain rule's host, and the hosts that a
    subdomain rule turns into another rule's host (``m.a`` for ``a -> x`` beside ``m.x -> …``).
    """
    rewrites = Rewrites(rules)
    probes = {rule.from_host for rule in rules}
    for parent in (rule for rule in rules if rule.subdomains):
        probes.add("probe." + parent.from_host)
        for other in rules:
            if other.from_host.endswith("." + parent.to_host):
                probes.add(other.from_host[: -len(parent.to_host)] + parent.from_host)
    for host in sorted(probes):
        rewrites.resolve(host)


def describe_chain(rules: Sequence[Rule], host: str) -> str:
    """``a -> b -> c``: a host's chain as an operator reads it."""
    resolved = Rewrites(rules).resolve(host)
    hops = [host]
    current = host
    for rule in resolved.rules:
        current = rule.apply(current) or current
        hops.append(current)
    return " -> ".join(hops)


def webhook_shown(url: str | None) -> str | None:
    """A webhook URL as operators see it: scheme and host only (its path or query may hold a
    token, like a Slack or Airflow hook's)."""
    if not url:
        return url
    parts = urlsplit(url)
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{rest}"
