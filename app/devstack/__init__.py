"""Real services started by the project itself: Apache Kafka (KRaft), PostgreSQL, and Tansu for `qm dev`."""

from __future__ import annotations

import socket


class ServiceUnavailable(RuntimeError):
    """A service could not be started; the message names what is missing."""


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
