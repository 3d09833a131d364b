"""The interface of a downstream target: what it is handed, and how it says it failed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Delivery:
    """What a target is handed: the capture, its attempt (1 for the first) and the site's
    downstream settings."""

    capture_id: str
    job_id: str
    site: str
    url: str
    storage_uri: str
    sha256: str
    content_type: str
    size: int
    captured_at: datetime
    meta: dict[str, Any]
    attempt: int
    dag_id: str | None
    webhook_url: str | None


class TargetError(Exception):
    """A delivery that did not happen: ``reason`` says why, ``retryable`` whether trying again
    later may succeed (a timeout or a server error) or never will (a refusal)."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Target(Protocol):
    """A downstream effect. ``deliver`` returns on success and raises ``TargetError`` otherwise.

    A delivery may be repeated (the handoff worker can die between the effect and its
    finalisation), so a target makes its effect idempotent by ``delivery.capture_id``.
    """

    name: str

    async def deliver(self, delivery: Delivery) -> None: ...
