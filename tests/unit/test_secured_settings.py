"""Pure logic of the secured transport: the ACL set's shape, and when a process warns that it talks
in the clear."""

from __future__ import annotations

import shlex
import ssl

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr

from app.commands.failures import explain
from app.kafka_acls import acl_commands, acl_set, merged
from app.sdk.connection_check import _refused
from app.settings import Settings, get_settings
from app.transport import transport_warnings


def grants_of(principal: str, settings: Settings) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [
        (g.operations, g.topics + g.groups)
        for g in acl_set(settings, collectors=("crawler-7",))
        if g.principal == principal
    ]


def test_secured_acl_set_gives_a_collector_requests_to_write_and_its_replies_to_read() -> None:
    settings = Settings(topic_prefix="qm.")
    assert grants_of("crawler-7", settings) == [
        (("Write", "Describe"), ("qm.requests",)),
        (("Read", "Describe"), ("qm.replies", "qm.replies.crawler-7")),
        (("Read",), ("crawler-7",)),
    ]
    # nothing of the collector's names a topic only Quartermaster may read or write
    names = {name for _, names in grants_of("crawler-7", settings) for name in names}
    assert not names & {"qm.events", "qm.job-events", "qm.captures", "qm.requests.dlt"}
    assert grants_of("airflow", settings)[0] == (
        ("Read", "Describe"),
        ("qm.job-events", "qm.captures.ready", "qm.events"),
    )


def test_secured_acl_commands_are_runnable_and_carry_no_secret() -> None:
    settings = Settings(
        topic_prefix="qm.", kafka_sasl_password=SecretStr("hunter2-canary"), consumer_group="cw"
    )
    lines = acl_commands(acl_set(settings), "kafka-1:9093")
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert all(c[:3] == ["kafka-acls.sh", "--bootstrap-server", "kafka-1:9093"] for c in commands)
    service = commands[0]
    assert service[service.index("--resource-pattern-type") + 1] == "prefixed"
    assert service[service.index("--topic") + 1] == "qm."
    assert "hunter2-canary" not in "\n".join(lines)


def test_secured_merged_grants_keep_every_permission() -> None:
    grants = [g for p in ("a.", "b.") for g in acl_set(Settings(topic_prefix=p))]
    pairs = {
        (g.principal, op, g.prefixed, name)
        for g in grants
        for op in g.operations
        for name in g.topics + g.groups
    }
    joined = merged(grants)
    assert len(joined) < len(grants)
    assert pairs == {
        (g.principal, op, g.prefixed, name)
        for g in joined
        for op in g.operations
        for name in g.topics + g.groups
    }


@pytest.mark.parametrize(
    ("protocol", "servers", "warned"),
    [
        ("PLAINTEXT", "kafka-1:9092", True),
        ("SASL_PLAINTEXT", "10.0.0.5:9092", True),
        ("SASL_SSL", "kafka-1:9093", False),
        ("SSL", "kafka-1:9093", False),
        ("PLAINTEXT", "127.0.0.1:9092,localhost:9093", False),  # qm dev, the tests
        ("PLAINTEXT", "127.0.0.1:9092,kafka-2:9092", True),  # one remote is enough
    ],
)
def test_secured_warning_for_a_remote_broker_in_the_clear(
    protocol: str, servers: str, warned: bool
) -> None:
    settings = Settings(kafka_security_protocol=protocol, kafka_bootstrap_servers=servers)
    warnings = transport_warnings(settings)
    assert bool(warnings) is warned
    if protocol == "SASL_PLAINTEXT":
        assert "SASL password" in warnings[0]


def test_secured_warning_for_a_remote_database_without_tls() -> None:
    remote = "postgresql+asyncpg://qm:pw@db.internal:5432/qm"
    assert transport_warnings(Settings(database_url=remote)) == [
        "PostgreSQL at db.internal is reached without TLS: set QM_DATABASE_SSL=true "
        "(docs/security.md)"
    ]
    assert transport_warnings(Settings(database_url=remote, database_ssl=True)) == []
    assert transport_warnings(Settings(database_url=f"{remote}?sslmode=verify-full")) == []
    socket = "postgresql+asyncpg://postgres@/qm?host=/tmp/pg"
    assert transport_warnings(Settings(database_url=socket)) == []


@pytest.mark.parametrize(
    ("collectors", "refused"),
    [
        (["*"], "letters, digits"),
        (["qm-claim-workers"], "named like one of the service's own"),
        (["quartermaster"], "named like one of the service's own"),
        (["crawler 7"], "letters, digits"),
    ],
)
def test_secured_acl_set_refuses_principals_that_would_reach_further(
    collectors: list[str], refused: str
) -> None:
    with pytest.raises(ValueError, match=refused):
        acl_set(Settings(), collectors=collectors)


def test_secured_a_collectors_group_grant_is_its_one_group() -> None:
    [group] = [
        g for g in acl_set(Settings(), collectors=("qm",)) if g.principal == "qm" and g.groups
    ]
    assert group.groups == ("qm",) and not group.prefixed  # not every group beginning "qm"


@pytest.mark.parametrize(
    ("failure", "protocol", "at_start", "refused"),
    [
        (SaslAuthenticationFailed(), "SASL_SSL", True, True),
        (ssl.SSLCertVerificationError("certificate verify failed"), "SASL_SSL", True, True),
        (ssl.SSLEOFError("EOF occurred"), "SASL_SSL", True, False),  # a proxy hanging up
        (KafkaConnectionError("closed"), "PLAINTEXT", False, True),  # a failure seen: explained
        (KafkaConnectionError("closed"), "PLAINTEXT", True, False),  # at start: may be transient
        (KafkaConnectionError("closed"), "SASL_PLAINTEXT", False, True),
        (ConnectionRefusedError(), "PLAINTEXT", False, False),  # nobody listens: not a refusal
    ],
)
def test_secured_what_counts_as_a_refusal(
    failure: BaseException, protocol: str, at_start: bool, refused: bool
) -> None:
    options = {"security_protocol": protocol}
    assert _refused(failure, options, closed_counts=not at_start) is refused


def test_secured_a_refused_topic_names_the_user_and_the_acl_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_KAFKA_SASL_USERNAME", "collector")
    get_settings.cache_clear()
    line = explain(TopicAuthorizationFailedError("qm.requests"))
    get_settings.cache_clear()
    assert line is not None
    assert "refused user 'collector'" in line and "qm.requests" in line
    assert "qm topics --acls" in line
