"""What every sweep shares: the database, the services, and a result that says what it did."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from app.crypto import SecretBox
from app.leasing import Services
from app.settings import Settings
from app.store import Database


@dataclass
class SweepResult:
    """What one ``run_once`` did: the ids it changed, and the ones another actor got to first."""

    sweep: str
    changed: list[str] = field(default_factory=list)
    lost_races: list[str] = field(default_factory=list)


class Sweep:
    """A sweep: ``run_once(now)`` finds stale rows page by page and repairs each with a conditional update."""

    name: ClassVar[str] = "sweep"

    def __init__(self, settings: Settings, db: Database, secrets: SecretBox | None = None) -> None:
        self.settings = settings
        self.db = db
        self.services = Services(settings, secrets or SecretBox.from_settings(settings))

    async def run_once(self, now: datetime | None = None) -> SweepResult:
        raise NotImplementedError
