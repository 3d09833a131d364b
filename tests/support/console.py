"""The web console for tests: `qm run console`'s process in the test's event loop on a free port,
users of a users file, and Debian's Chromium driven by Playwright (a missing one fails)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright
from pydantic import SecretStr

from app.console.auth import users_line
from app.devstack import free_port
from app.health import Health
from app.root import Root
from app.settings import Settings
from tests.support.chromium import chromium_path
from tests.support.waiting import eventually
from workers.console import run_console

# canaries: none of them may appear on any page or in any response
TOKEN = "canary-console-token-7f3a"
SESSION_SECRET = "canary-session-key-91bd"
OPERATOR, VIEWER = "olga", "victor"
PASSWORD = "canary-password-c0ffee"
SCREENSHOTS = "QM_CONSOLE_SCREENSHOTS"  # a folder: the tests save their screenshots there too


@dataclass(frozen=True)
class Console:
    """A running console: its address and the settings it runs on."""

    url: str
    settings: Settings


def console_settings(settings: Settings, users_file: Path, **overrides: object) -> Settings:
    users_file.write_text(
        "# the console's users (tests)\n"
        f"{users_line(OPERATOR, 'operator', PASSWORD)}\n"
        f"{users_line(VIEWER, 'viewer', PASSWORD)}\n"
    )
    return settings.model_copy(
        update={
            "console_token": SecretStr(TOKEN),
            "console_users_file": str(users_file),
            "console_session_secret": SecretStr(SESSION_SECRET),
            "console_port": free_port(),
            "console_refresh_seconds": 0.3,
            **overrides,
        }
    )


async def serve_console(settings: Settings) -> AsyncIterator[Console]:
    """Run the console process until the test ends; its address once it answers."""
    stop = asyncio.Event()
    wiring = Root(settings, Health()).wiring("console", stop)
    task = asyncio.create_task(run_console(wiring))
    url = f"http://127.0.0.1:{settings.console_port}"

    async def answers() -> bool:
        assert not task.done(), task.exception()
        async with httpx.AsyncClient() as client:
            try:
                return (await client.get(f"{url}/login")).status_code == 200
            except httpx.TransportError:
                return False

    try:
        await eventually(answers, timeout=20)
        yield Console(url, settings)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        finally:
            await wiring.close()


@pytest.fixture(name="console")
async def console_fixture(topics: Settings, tmp_path: Path) -> AsyncIterator[Console]:
    """The console on the test's database and topics, with the users ``OPERATOR`` and ``VIEWER``."""
    async for running in serve_console(console_settings(topics, tmp_path / "users")):
        yield running


@pytest.fixture(name="browser")
async def browser_fixture() -> AsyncIterator[Browser]:
    """Debian's Chromium; a missing one fails the test, it does not skip it."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=chromium_path())
        yield chromium
        await chromium.close()


async def sign_in(browser: Browser, console: Console, name: str = OPERATOR) -> Page:
    """A new browser context signed in as ``name`` with the users file's password."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    await page.goto(f"{console.url}/")
    assert page.url.endswith("/login")
    form = page.locator("#password-login")
    await form.locator("input[name=name]").fill(name)
    await form.locator("input[name=password]").fill(PASSWORD)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(f"{console.url}/")
    return page


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """A screenshot of the page (kept in ``QM_CONSOLE_SCREENSHOTS`` too when it is set)."""
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    if folder := os.environ.get(SCREENSHOTS):
        shutil.copy(path, Path(folder) / path.name)
