"""Downstream targets of the handoff worker, chosen per site.

Every capture's default downstream is its ``capture.ready`` record on ``qm.captures.ready``,
written through the outbox in the transaction that finalises the handoff (so it is not a target
here). ``HandoffTargets`` adds the effects a site asks for, one module each; it is built once per
process (``app.root``) and asked for each delivery's targets.
"""

from __future__ import annotations

from app.handoff.airflow import AirflowTarget
from app.handoff.base import Delivery, Target, TargetError
from app.handoff.webhook import WebhookTarget
from app.settings import Settings

__all__ = ["Delivery", "HandoffTargets", "Target", "TargetError"]


class HandoffTargets:
    """The targets a capture may be handed to, built once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.webhook = WebhookTarget(settings.webhook_timeout_seconds)
        self.airflow = AirflowTarget.from_settings(settings)

    def __call__(self, delivery: Delivery) -> list[Target]:
        """The downstream effects of one delivery, in the order they run."""
        targets: list[Target] = []
        if delivery.webhook_url:
            targets.append(self.webhook)
        if delivery.dag_id:
            targets.append(self.airflow)
        return targets
