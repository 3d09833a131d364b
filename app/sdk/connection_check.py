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
    if isinstance(exc, KafkaConnectionError) and not protocol.endswith("SSL"):
        return (
            f"{server} closed the connection: it may require TLS or SASL "
            f"(the client speaks {protocol})"
        )
    if isinstance(exc, TimeoutError):
        return f"{server} did not answer within {PROBE_SECONDS:.0f} s"
    if isinstance(exc, OSError):
        return f"{server}: {exc.strerror or type(exc).__name__}"
    return f"{server}: {type(exc).__name__}"


# failures no retry mends: the broker answers, and refuses the client as configured (an EOF in the
# middle of a handshake is not one: a proxy whose backend is not up yet ends connections so too)
REFUSALS = (SaslAuthenticationFailed, ssl.SSLCertVerificationError)
NOT_REFUSALS = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _refused(exc: BaseException, options: dict[str, Any], *, closed_counts: bool) -> bool:
    if isinstance(exc, REFUSALS):
        return True
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, NOT_REFUSALS):
        return True  # a handshake the broker answered, with something the client cannot accept
    protocol = options.get("security_protocol", "PLAINTEXT")
    # a client without TLS that a TLS listener hangs up on; a proxy does so too while its backend
    # is down, so only a failure already seen (the CLI's, the SDK's) is explained this way
    return closed_counts and isinstance(exc, KafkaConnectionError) and not protocol.endswith("SSL")


async def refusal(
    bootstrap_servers: str | list[str], options: dict[str, Any], *, at_start: bool = False
) -> str | None:
    """``why_unreachable``'s line when every bootstrap server answers and refuses the client's
    credentials, certificate or protocol; None otherwise. ``at_start``: only what no retry can
    mend (a process stops at start then), not a connection closed at once."""
    return await why_unreachable(
        bootstrap_servers, options, only_refusals=True, closed_counts=not at_start
    )


async def _probe(server: str, options: dict[str, Any]) -> BaseException | None:
    host, _, port = server.rpartition(":")
    if not host:  # no port: Kafka's default, as the client takes it
        host, port = server, "9092"
    try:
        conn = await asyncio.wait_for(
            create_conn(host.strip("[]"), int(port), **options), PROBE_SECONDS
        )
    except (KafkaError, OSError, ValueError) as exc:  # TimeoutError is an OSError
        return exc
    conn.close()
    return None


async def why_unreachable(
    bootstrap_servers: str | list[str],
    options: dict[str, Any],
    *,
    only_refusals: bool = False,
    closed_counts: bool = True,
) -> str | None:
    """One line naming why none of ``bootstrap_servers`` accepts a client with ``options``
    (aiokafka security options); None when one accepts it (or, with ``only_refusals``, when
    one does not refuse it: nobody listening is not a refusal). The servers are tried at once,
    so the answer takes at most ``PROBE_SECONDS``."""
    chosen = {name: value for name, value in options.items() if name in _OPTIONS}
    servers = (
        bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    )
    named = [s.strip() for s in servers if s.strip()]
    if not named:
        return None if only_refusals else f"no bootstrap server in {bootstrap_servers!r}"
    failures = await asyncio.gather(*(_probe(server, chosen) for server in named))
    if any(failure is None for failure in failures):
        return None
    found = list(zip(named, failures, strict=True))
    if only_refusals and not all(
        _refused(exc, chosen, closed_counts=closed_counts) for _, exc in found if exc
    ):
        return None
    return "; ".join(_why(server, exc, chosen) for server, exc in found if exc)
