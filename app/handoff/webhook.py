"""The HTTP webhook target: POSTs the capture as JSON to the site's ``webhook_url``.

The ``Idempotency-Key`` header is the capture id, so a receiver that sees a delivery repeated
(after a handoff worker died between the effect and its finalisation) can tell. A 2xx answer is
success; 408, 425, 429 and 5xx answers, timeouts and connection failures are worth a retry; any
other 4xx is a refusal that no retry mends.
"""

from __future__ import annotations

import httpx

from app.handoff.base import Delivery, TargetError
from app.handoff.http import call_errors, capture_fields, retryable_status


def payload(delivery: Delivery) -> dict[str, object]:
    """The JSON body the webhook receives."""
    return {
        "type": "capture.ready",
        "v": 1,
        **capture_fields(delivery),
        "attempt": delivery.attempt,
    }


def classify_status(status: int) -> TargetError | None:
    """None for success; otherwise the error an HTTP status stands for."""
    if 200 <= status < 300:
        return None
    return TargetError(f"webhook answered HTTP {status}", retryable=retryable_status(status))


class WebhookTarget:
    """Delivers to ``delivery.webhook_url`` with a timeout for the whole exchange."""

    name = "webhook"

    def __init__(self, timeout_seconds: float, client: httpx.AsyncClient | None = None) -> None:
        self.timeout = httpx.Timeout(timeout_seconds)
        self._client = client

    async def deliver(self, delivery: Delivery) -> None:
        if delivery.webhook_url is None:
            raise TargetError("the site has no webhook_url", retryable=False)
        headers = {"Idempotency-Key": delivery.capture_id}
        async with call_errors("webhook"):
            if self._client is not None:
                response = await self._post(self._client, delivery, headers)
            else:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await self._post(client, delivery, headers)
        error = classify_status(response.status_code)
        if error is not None:
            raise error

    async def _post(
        self, client: httpx.AsyncClient, delivery: Delivery, headers: dict[str, str]
    ) -> httpx.Response:
        assert delivery.webhook_url is not None
        return await client.post(
            delivery.webhook_url, json=payload(delivery), headers=headers, timeout=self.timeout
        )
