"""What protects a process's connections, for operators: the warning at start when a process
talks to a remote broker or database in the clear, and the ``transport`` section of ``/readyz``
(the security protocol, and when the broker's certificate expires)."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka.helpers import create_ssl_context
from sqlalchemy.engine import make_url

from app.sdk.connection_check import refusal
from app.settings import Settings

log = structlog.get_logger()

CERTIFICATE_CACHE_SECONDS = 60.0
HANDSHAKE_SECONDS = 2.0  # within /readyz's own limit, so a broker down answers, not times out


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    found = []
    for server in (s.strip() for s in bootstrap.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        found.append((host.strip("[]"), int(port) if port.isdigit() else 9092))
    return found


def transport_warnings(settings: Settings) -> list[str]:
    """Why this process's connections are not protected: a broker or database off this machine
    reached without TLS (loopback, as ``qm dev`` and the tests run, is not warned about)."""
    warnings = []
    protocol = settings.kafka_security_protocol
    remote = [h for h, _ in _hosts(settings.kafka_bootstrap_servers) if not _loopback(h)]
    if protocol in ("PLAINTEXT", "SASL_PLAINTEXT") and remote:
        what = "requests, replies and events" + (
            " and the SASL password" if protocol == "SASL_PLAINTEXT" else ""
        )
        warnings.append(
            f"Kafka at {', '.join(remote)} is reached over {protocol}: {what} cross the network "
            "in the clear; set QM_KAFKA_SECURITY_PROTOCOL=SASL_SSL (docs/security.md)"
        )
    url = make_url(settings.database_url)
    host = url.host or ""
    tls_in_url = url.query.get("ssl") in ("require", "verify-ca", "verify-full", "true")
    if url.host and not _loopback(host) and not settings.database_ssl and not tls_in_url:
        warnings.append(
            f"PostgreSQL at {host} is reached without TLS: set QM_DATABASE_SSL=true "
            "(docs/security.md)"
        )
    return warnings


def warn_if_in_the_clear(settings: Settings) -> None:
    """Log each of ``transport_warnings`` once, at a process's start."""
    for warning in transport_warnings(settings):
        log.warning("connection_in_the_clear", detail=warning)


class BrokerRefused(RuntimeError):
    """The broker answers and refuses this process's credentials or certificate."""


async def refuse_to_start_when_refused(settings: Settings) -> None:
    """Stop a process at start, with the reason, when the broker refuses how it connects: no
    retry mends a wrong password or an untrusted certificate (one probe connection)."""
    from app.kafka import client_options

    reason = await refusal(
        settings.kafka_bootstrap_servers, client_options(settings), at_start=True
    )
    if reason:
        raise BrokerRefused(f"the Kafka broker cannot be used: {reason}")


async def certificate_not_after(host: str, port: int, cafile: str | None) -> datetime:
    """When the certificate ``host:port`` presents expires (verified against ``cafile``)."""
    context = create_ssl_context(cafile=cafile)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=host), HANDSHAKE_SECONDS
    )
    try:
        certificate = writer.get_extra_info("peercert") or {}
    finally:
        writer.close()
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(certificate["notAfter"]), UTC)


class TransportReport:
    """The ``transport`` section of ``/readyz``; the certificates of every bootstrap server are
    looked at once a minute. ``certificate_expires`` and ``certificate_days_left`` are the
    soonest of them; ``certificate_error`` names each server whose certificate could not be read
    (a broker that fails its handshake fails the clients sent to it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._certificate: tuple[float, dict[str, Any]] | None = None

    async def __call__(self) -> dict[str, Any]:
        settings = self.settings
        kafka: dict[str, Any] = {
            "security_protocol": settings.kafka_security_protocol,
            "sasl_mechanism": settings.kafka_sasl_mechanism,
        }
        if settings.kafka_security_protocol.endswith("SSL"):
            kafka.update(await self._broker_certificates())
        return {
            "kafka": kafka,
            "database": {"tls": settings.database_ssl},
            "warnings": transport_warnings(settings),
        }

    async def _broker_certificates(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._certificate and now - self._certificate[0] < CERTIFICATE_CACHE_SECONDS:
            return self._certificate[1]
        servers = _hosts(self.settings.kafka_bootstrap_servers)
        looked = await asyncio.gather(
            *(certificate_not_after(host, port, self.settings.kafka_ssl_cafile)
              for host, port in servers),
            return_exceptions=True,
        )  # fmt: skip
        found: dict[str, Any] = {}
        errors = []
        expiries = []
        for (host, port), result in zip(servers, looked, strict=True):
            if isinstance(result, datetime):
                expiries.append(result)
            elif isinstance(result, OSError | KeyError | ValueError):
                errors.append(f"{host}:{port}: {type(result).__name__}: {result}"[:300])
            else:
                raise result
        if expiries:
            soonest = min(expiries)
            found["certificate_expires"] = soonest.isoformat()
            days = (soonest - datetime.now(UTC)).total_seconds() / 86400
            found["certificate_days_left"] = round(days, 1)
        if errors:
            found["certificate_error"] = "; ".join(errors)
        self._certificate = (now, found)
        return found
