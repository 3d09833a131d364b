"""What the HTTP targets share: the capture's fields as JSON, the failures of the call itself, and
which HTTP answers are worth a retry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app.handoff.base import Delivery, TargetError

RETRYABLE_CLIENT_ERRORS = frozenset({408, 425, 429})


def capture_fields(delivery: Delivery) -> dict[str, Any]:
    """The capture's fields, as in its ``capture.ready`` record."""
    return {
        "capture_id": delivery.capture_id,
        "job_id": delivery.job_id,
        "site": delivery.site,
        "url": delivery.url,
        "storage_uri": delivery.storage_uri,
        "sha256": delivery.sha256,
        "content_type": delivery.content_type,
        "size": delivery.size,
        "captured_at": delivery.captured_at.isoformat(),
        "meta": delivery.meta,
    }


def retryable_status(status: int) -> bool:
    """A server error, or a client error that says "later" (timeout, too early, too many)."""
    return status >= 500 or status in RETRYABLE_CLIENT_ERRORS


@asynccontextmanager
async def call_errors(target: str) -> AsyncIterator[None]:
    """Turn a timeout or a connection failure inside the block into a retryable ``TargetError``
    that names ``target`` (never the URL, which may carry a secret)."""
    try:
        yield
    except httpx.TimeoutException:
        raise TargetError(f"{target} timed out", retryable=True) from None
    except httpx.TransportError as exc:
        raise TargetError(f"{target} unreachable: {type(exc).__name__}", retryable=True) from None
