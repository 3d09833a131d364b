"""Why a Kafka client cannot connect, in one line: the Kafka client only says it "cannot bootstrap"
and logs the cause once per attempt; one direct connection to each bootstrap server names it (the
certificate, the credentials, the protocol, or nobody listening)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, SaslAuthenticationFailed

PROBE_SECONDS = 10.0
_OPTIONS = (
    "ssl_context", "security_protocol", "sasl_mechanism",
    "sasl_plain_username", "sasl_plain_password",
)  # fmt: skip


def _why(server: str, exc: BaseException, options: dict[str, Any]) -> str:
    protocol = options.get("security_protocol", "PLAINTEXT")
    if isinstance(exc, SaslAuthenticationFailed):
        user = options.get("sasl_plain_username") or ""
        return (
            f"{server} refused the {options.get('sasl_mechanism')} credentials of user "
            f"{user!r} (wrong user name or password)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the certificate of {server} is not trusted ({exc.verify_message}): "
            "check the CA file the client trusts"
        )
    if isinstance(exc, ssl.SSLError):
        return f"the TLS handshake with {server} failed ({exc.reason or exc}) over {protocol}"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing listens at {server}"
    if isinstance(exc, KafkaConnectionError) and protocol == "PLAINTEXT":
        return (
            f"{server} closed the connection: it may require TLS or SASL "
            "(the client speaks PLAINTEXT)"
        )
    if isinstance(exc, TimeoutError):
        return f"{server} did not answer within {PROBE_SECONDS:.0f} s"
    if isinstance(exc, OSError):
        return f"{server}: {exc.strerror or type(exc).__name__}"
    return f"{server}: {type(exc).__name__}"


# failures no retry mends: the broker answers, and refuses the client as configured
REFUSALS = (SaslAuthenticationFailed, ssl.SSLError)


async def refusal(bootstrap_servers: str | list[str], options: dict[str, Any]) -> str | None:
    """``why_unreachable``'s line when a broker answers and refuses the client's credentials or
    certificate (a process stops at start then: retrying cannot help); None otherwise."""
    return await why_unreachable(bootstrap_servers, options, only_refusals=True)


async def why_unreachable(
    bootstrap_servers: str | list[str], options: dict[str, Any], *, only_refusals: bool = False
) -> str | None:
    """One line naming why none of ``bootstrap_servers`` accepts a client with ``options``
    (aiokafka security options); None when one accepts it (or, with ``only_refusals``, when
    none refuses it: nobody listening is not a refusal)."""
    chosen = {name: value for name, value in options.items() if name in _OPTIONS}
    reasons: list[str] = []
    servers = (
        bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    )
    for server in (s.strip() for s in servers if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), **chosen), PROBE_SECONDS
            )
        except (KafkaError, OSError, ValueError) as exc:  # TimeoutError is an OSError
            refused = isinstance(exc, REFUSALS) or (
                isinstance(exc, KafkaConnectionError)
                and chosen.get("security_protocol", "PLAINTEXT") == "PLAINTEXT"
            )
            if refused or not only_refusals:
                reasons.append(_why(server, exc, chosen))
            continue
        conn.close()
        return None
    if only_refusals:
        return "; ".join(reasons) or None
    return "; ".join(reasons) or f"no bootstrap server in {bootstrap_servers!r}"
