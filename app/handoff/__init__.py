"""Downstream targets of the handoff worker, chosen per site.

Every capture's default downstream is its ``capture.ready`` record on ``qm.captures.ready``,
written through the outbox in the transaction that finalises the handoff (so it is not a target
here). ``targets_for`` adds the effects a site asks for, one module each.
"""

from __future__ import annotations

from app.handoff.airflow import AirflowTarget
from app.handoff.base import Delivery, Target, TargetError
from app.handoff.webhook import WebhookTarget
from app.settings import Settings

__all__ = ["Delivery", "Target", "TargetError", "targets_for"]


def targets_for(delivery: Delivery, settings: Settings) -> list[Target]:
    """The downstream effects of one delivery, in the order they run."""
    targets: list[Target] = []
    if delivery.webhook_url:
        targets.append(WebhookTarget(settings.webhook_timeout_seconds))
    if delivery.dag_id:
        targets.append(AirflowTarget.from_settings(settings))
    return targets
