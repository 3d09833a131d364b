"""Posting alerts: to a Slack incoming webhook (slack_sdk's async client), or only to the log."""

from __future__ import annotations

import structlog
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.webhook.async_client import AsyncWebhookClient

from app.alerts.book import Post

log = structlog.get_logger()

POST_TIMEOUT_SECONDS = 10


class Notifier:
    """Sends each post to Slack when a webhook is configured; logs every post either way."""

    def __init__(self, webhook_url: str | None) -> None:
        self._client = (
            AsyncWebhookClient(
                webhook_url,
                timeout=POST_TIMEOUT_SECONDS,
                retry_handlers=[
                    AsyncConnectionErrorRetryHandler(),
                    AsyncRateLimitErrorRetryHandler(max_retry_count=2),
                ],
            )
            if webhook_url
            else None
        )

    async def send(self, post: Post) -> bool:
        """Post it; False if Slack refused or could not be reached (the alert is logged anyway)."""
        log.warning("alert", cause=post.cause, recovered=post.recovered, text=post.text)
        if self._client is None:
            return True
        emoji = ":white_check_mark:" if post.recovered else ":rotating_light:"
        try:
            response = await self._client.send(text=f"{emoji} {post.text}")
        except Exception as exc:  # noqa: BLE001 - an alert that cannot be sent must not stop the watch
            log.warning("alert_not_sent", cause=post.cause, error_class=type(exc).__name__)
            return False
        if response.status_code != 200:
            log.warning("alert_refused", cause=post.cause, status=response.status_code)
            return False
        return True
