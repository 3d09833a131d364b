"""Fixtures the integration tests share: the store and a request processor on the test's database."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.settings import Settings
from app.store import Database
from workers.requests import RequestProcessor


@pytest.fixture
def db(engine: AsyncEngine) -> Database:
    return Database(engine)


@pytest.fixture
def processor(settings: Settings, db: Database) -> RequestProcessor:
    """The claim workers' request processor with the test's settings (a test module that needs
    other settings defines its own)."""
    return RequestProcessor(settings, db)
