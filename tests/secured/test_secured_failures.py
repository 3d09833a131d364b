"""A wrong password or an untrusted certificate fails fast with one line naming what failed, and
no password ever shows; operators see what protects the connections in ``/readyz``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from app.devstack import free_port
from app.devstack.certificates import make_tls_files
from app.kafka import sdk_client
from app.kafka_acls import COLLECTOR
from app.sdk import BrokerUnavailable
from app.settings import Settings
from app.transport import TransportReport
from tests.secured.conftest import SecuredStack, as_principal
from tests.support.processes import QmProcess, settings_env
from tests.support.waiting import eventually

WRONG = "not-the-password-0f9e8d"
FAST = 30.0  # seconds a refused command may take, interpreter start included


def qm(settings: Settings, *args: str, **overrides: object) -> tuple[int, str, float]:
    """Run ``qm args`` as an operator would; (exit code, stdout + stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "app", *args], env=settings_env(settings, **overrides),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def assert_one_line(code: int, output: str, seconds: float, *words: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1, output
    assert "Traceback" not in output
    assert all(word in lines[0] for word in words), lines[0]
    assert seconds < FAST, f"{seconds:.1f} s: {output}"


def assert_no_password(output: str, stack: SecuredStack, *extra: str) -> None:
    for secret in (*stack.security.users.values(), stack.security.controller_password, *extra):
        assert secret not in output


async def test_secured_wrong_password_is_one_line_naming_the_user(
    settings: Settings, secured_stack: SecuredStack
) -> None:
    code, output, seconds = await asyncio.to_thread(
        qm, settings, "topics", kafka_sasl_password=WRONG
    )
    assert_one_line(code, output, seconds, "credentials of user 'quartermaster'", "PASSWORD")
    assert_no_password(output, secured_stack, WRONG)


async def test_secured_untrusted_certificate_is_one_line_naming_the_certificate(
    settings: Settings, secured_stack: SecuredStack, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other", label="stranger")
    code, output, seconds = await asyncio.to_thread(
        qm, settings, "topics", kafka_ssl_cafile=str(stranger.ca_cert)
    )
    assert_one_line(code, output, seconds, "certificate", "not trusted", "QM_KAFKA_SSL_CAFILE")
    assert_no_password(output, secured_stack)


async def test_secured_plaintext_client_is_told_the_broker_wants_more(
    settings: Settings, secured_stack: SecuredStack
) -> None:
    code, output, seconds = await asyncio.to_thread(
        qm, settings, "topics", kafka_security_protocol="PLAINTEXT", kafka_sasl_mechanism=None
    )
    assert_one_line(code, output, seconds, "TLS or SASL", "QM_KAFKA_SECURITY_PROTOCOL")


async def test_secured_process_with_a_wrong_password_stops_with_one_line(
    settings: Settings, secured_stack: SecuredStack
) -> None:
    """A claim worker given a wrong password exits at start (no retry storm), saying why."""
    code, output, seconds = await asyncio.to_thread(
        qm, settings, "run", "worker", kafka_sasl_password=WRONG
    )
    assert code == 2, output
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert "credentials of user 'quartermaster'" in last, output
    assert "SaslAuthenticationFailed" not in output, output  # stopped before any client retried
    assert seconds < FAST, output
    assert_no_password(output, secured_stack, WRONG)


async def test_secured_sdk_with_a_wrong_password_raises_naming_the_credentials(
    topics: Settings, secured_stack: SecuredStack, caplog: pytest.LogCaptureFixture
) -> None:
    collector = as_principal(topics, secured_stack, COLLECTOR)
    wrong = collector.model_copy(update={"kafka_sasl_password": SecretStr(WRONG)})
    with capture_logs() as logged, pytest.raises(BrokerUnavailable) as refused:
        async with sdk_client(wrong, collector="wrong-password"):
            pass
    assert f"credentials of user {COLLECTOR!r}" in str(refused.value)
    # the canary: neither password in the error, its chain, the client's repr or any log line
    async with sdk_client(collector, collector="right-password") as client:
        shown = repr(client) + repr(collector)
    chain = "".join(traceback.format_exception(refused.value))
    everything = chain + shown + caplog.text + repr(logged)
    assert_no_password(everything, secured_stack, WRONG)


async def test_secured_database_with_an_untrusted_certificate_is_one_line(
    settings: Settings, secured_stack: SecuredStack, tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other", label="stranger")
    code, output, seconds = await asyncio.to_thread(
        qm, settings, "sites", "list", database_ssl_cafile=str(stranger.ca_cert)
    )
    assert_one_line(code, output, seconds, "database", "certificate", "QM_DATABASE_SSL_CAFILE")
    # and without TLS the server refuses the connection: TLS is not optional there
    code, output, seconds = await asyncio.to_thread(
        qm,
        settings,
        "sites",
        "list",
        database_ssl="false",
        database_url=f"{settings.database_url}?ssl=disable",
    )
    assert_one_line(code, output, seconds, "database", "no encryption")


async def test_readyz_looks_at_every_bootstrap_server_s_certificate_and_names_the_one_that_fails(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    silent = f"127.0.0.1:{free_port()}"  # nothing listens: its handshake cannot happen
    servers = f"{secured_stack.broker.bootstrap},{silent}"
    report = TransportReport(topics.model_copy(update={"kafka_bootstrap_servers": servers}))

    kafka = (await report())["kafka"]

    assert kafka["certificate_expires"] == secured_stack.tls.not_after.isoformat()
    assert kafka["certificate_error"].startswith(f"{silent}: ConnectionRefusedError")
    assert secured_stack.broker.bootstrap not in kafka["certificate_error"]


async def test_secured_readyz_names_the_protocol_and_the_certificates_expiry(
    topics: Settings, secured_stack: SecuredStack
) -> None:
    port = free_port()
    with QmProcess(topics, "relay", metrics_port=port) as relay:

        def readyz() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
                return json.loads(answer.read())

        async def answered() -> dict | None:
            try:
                return await asyncio.to_thread(readyz)
            except OSError:
                return None

        body = await eventually(answered, timeout=60)
        output = relay.output()
    transport = body["transport"]
    assert transport["kafka"]["security_protocol"] == "SASL_SSL"
    assert transport["kafka"]["sasl_mechanism"] == "SCRAM-SHA-512"
    assert transport["kafka"]["certificate_expires"] == secured_stack.tls.not_after.isoformat()
    assert 6 < transport["kafka"]["certificate_days_left"] <= 7
    assert transport["database"] == {"tls": True}
    assert transport["warnings"] == []
    assert_no_password(json.dumps(body) + output, secured_stack)
