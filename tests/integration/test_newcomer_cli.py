"""A newcomer's `qm` against the real database: the URL forms people paste just work."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.migrate import upgrade
from app.settings import Settings
from tests.support.cli import Qm, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import make_site


@pytest.mark.parametrize("driver", ["postgresql", "postgresql+psycopg2"])
async def test_newcomer_a_postgresql_url_of_another_driver_reaches_the_database(
    qm: Qm, settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    await make_site(engine, settings)
    pasted = make_url(settings.database_url).set(drivername=driver)
    monkeypatch.setenv("QM_DATABASE_URL", pasted.render_as_string(hide_password=False))
    result = await qm("sites", "list")
    assert result.exit_code == 0, result.output
    assert "board" in result.stdout


async def test_newcomer_migrations_take_a_postgresql_url_of_another_driver(
    settings: Settings,
) -> None:
    pasted = make_url(settings.database_url).set(drivername="postgresql")
    # what the harness and `qm bench` do with a DATABASE_URL as people paste it
    await asyncio.to_thread(upgrade, pasted.render_as_string(hide_password=False))
