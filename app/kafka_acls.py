"""The broker's ACL set, the threat model in the broker's own terms: collectors write requests and
read replies, only Quartermaster reads requests and writes replies and events, Airflow reads what
it waits on. ``qm topics --acls`` prints it as ``kafka-acls`` commands; the secured test broker
applies the same commands.

Principals are SASL user names. Every grant is an allow; the broker denies what none allows
(``allow.everyone.if.no.acl.found=false``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from app.settings import Settings

SERVICE = "quartermaster"
COLLECTOR = "collector"
AIRFLOW = "airflow"
# what Airflow reads: the job events its sensors wait on, handed-off captures, the history
AIRFLOW_TOPICS = ("job-events", "captures.ready", "events")


@dataclass(frozen=True)
class AclGrant:
    """One ``kafka-acls --add``: ``principal`` may do ``operations`` on every named resource."""

    principal: str
    operations: tuple[str, ...]
    topics: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    prefixed: bool = False
    why: str = ""

    def arguments(self) -> list[str]:
        """The grant as kafka-acls arguments (without the connection options)."""
        arguments = ["--add", "--allow-principal", f"User:{self.principal}"]
        for operation in self.operations:
            arguments += ["--operation", operation]
        arguments += ["--resource-pattern-type", "prefixed" if self.prefixed else "literal"]
        for topic in self.topics:
            arguments += ["--topic", topic]
        for group in self.groups:
            arguments += ["--group", group]
        return arguments


def service_groups(settings: Settings) -> tuple[str, ...]:
    """The consumer groups Quartermaster's own processes join."""
    return (
        settings.consumer_group,
        settings.handoff_consumer_group,
        settings.alert_consumer_group,
    )


def acl_set(
    settings: Settings,
    *,
    service: str = SERVICE,
    collectors: Sequence[str] = (COLLECTOR,),
    airflow: str = AIRFLOW,
) -> list[AclGrant]:
    """Every grant the deployment needs, for the settings' topic prefix and groups.

    A collector principal may read the shared replies topic and its own ``replies.<principal>``,
    and join consumer groups named after itself; nothing else. The shared replies topic carries
    every collector's replies, so what a lease is worth never rests on who can read it: each
    grant's secret is sealed to the requester's key (docs/security.md).
    """
    check_principals(settings, collectors, service=service, airflow=airflow)
    prefix = settings.topic_prefix
    grants = [
        AclGrant(
            service, ("All",), topics=(prefix,), prefixed=True,
            why="the service reads and writes every topic of its prefix, and creates them",
        ),
        AclGrant(
            service, ("All",), groups=service_groups(settings), prefixed=True,
            why="its claim workers', handoff workers' and alerter's consumer groups "
            "(prefixed: qm bench names its runs' groups after them)",
        ),
    ]  # fmt: skip
    for collector in collectors:
        grants += [
            AclGrant(
                collector, ("Write", "Describe"), topics=(settings.topic("requests"),),
                why="a collector sends requests",
            ),
            AclGrant(
                collector, ("Read", "Describe"),
                topics=(settings.topic("replies"), settings.topic(f"replies.{collector}")),
                why="and reads the shared replies topic and its own",
            ),
            AclGrant(
                collector, ("Read",), groups=(collector,),
                why="in the one consumer group named after it (the SDK itself uses none)",
            ),
        ]  # fmt: skip
    grants += [
        AclGrant(
            airflow, ("Read", "Describe"), topics=tuple(settings.topic(t) for t in AIRFLOW_TOPICS),
            why="Airflow reads job events, handed-off captures and the event history",
        ),
        AclGrant(
            airflow, ("Read",), groups=(airflow,), prefixed=True,
            why="in consumer groups named after itself",
        ),
    ]  # fmt: skip
    return grants


PRINCIPAL = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def check_principals(
    settings: Settings, collectors: Sequence[str], *, service: str = SERVICE, airflow: str = AIRFLOW
) -> None:
    """Refuse principal names whose grants would reach further than their own: ``*`` (every
    user), names a topic could not carry, a collector named like a service group, or an Airflow
    name that begins a service group (its groups are granted by prefix)."""
    groups = service_groups(settings)
    for name in (service, airflow, *collectors):
        if not PRINCIPAL.match(name):
            raise ValueError(f"principal {name!r}: use letters, digits, '.', '_' or '-'")
    for collector in collectors:
        if collector in (service, airflow) or collector in groups:
            raise ValueError(f"collector {collector!r} is named like one of the service's own")
    if any(group.startswith(airflow) for group in groups):
        raise ValueError(f"a service consumer group begins with {airflow!r}, Airflow's groups")


def acl_commands(grants: Sequence[AclGrant], bootstrap: str) -> list[str]:
    """The grants as shell lines an operator runs (with an admin's ``--command-config``)."""
    lines: list[str] = []
    for grant in grants:
        lines.append(f"# {grant.why}")
        lines.append(
            shlex.join(
                [
                    "kafka-acls.sh",
                    "--bootstrap-server",
                    bootstrap,
                    "--command-config",
                    "admin.properties",
                    *grant.arguments(),
                ]
            )
        )
    return lines


def merged(grants: Sequence[AclGrant]) -> list[AclGrant]:
    """The same grants in fewer commands: those of one principal, operations and pattern type
    share one ``kafka-acls --add`` (it grants every operation on every resource it names)."""
    joined: dict[tuple[str, tuple[str, ...], bool], AclGrant] = {}
    for grant in grants:
        key = (grant.principal, grant.operations, grant.prefixed)
        before = joined.get(key)
        if before is None:
            joined[key] = grant
            continue
        joined[key] = AclGrant(
            grant.principal,
            grant.operations,
            topics=tuple(dict.fromkeys(before.topics + grant.topics)),
            groups=tuple(dict.fromkeys(before.groups + grant.groups)),
            prefixed=grant.prefixed,
            why=before.why,
        )
    return list(joined.values())
