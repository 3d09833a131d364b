"""The web console in real Chromium against the real database and broker: signing in, the
overview with `qm sites list`'s figures (refreshed live), the job page, and `qm run console`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.settings import Settings
from app.store import accounts, captures, domains, seeds
from app.urls import webhook_shown
from schemas.states import AccountStatus, SeedStatus
from tests.support.cli import Qm, qm_fixture  # noqa: F401 - the `qm` fixture
from tests.support.console import (
    OPERATOR,
    PASSWORD,
    TOKEN,
    VIEWER,
    Console,
    browser_fixture,  # noqa: F401 - the `browser` fixture
    console_fixture,  # noqa: F401 - the `console` fixture
    console_settings,
    screenshot,
    sign_in,
)
from tests.support.leasing import make_site, start
from tests.support.processes import QmProcess
from tests.support.waiting import eventually
from workers.requests import RequestProcessor


async def test_no_page_is_served_without_sign_in_and_wrong_credentials_are_refused(
    console: Console, browser: Browser
) -> None:
    page = await (await browser.new_context()).new_page()
    for path in ("/", "/sites", "/accounts", "/jobs", "/seeds", "/captures", "/dead-letters"):
        await page.goto(console.url + path)
        assert page.url == f"{console.url}/login", path
    async with httpx.AsyncClient(base_url=console.url) as client:
        assert (await client.post("/accounts/block", data={"site": "board"})).status_code == 401
        assert (await client.get("/overview/stream")).status_code == 303
    form = page.locator("#token-login")
    await form.locator("input[name=token]").fill("not-the-token")
    await form.locator("button[type=submit]").click()
    assert "wrong credentials" in await page.locator(".problem").inner_text()
    form = page.locator("#password-login")
    await form.locator("input[name=name]").fill(OPERATOR)
    await form.locator("input[name=password]").fill("not-the-password")
    await form.locator("button[type=submit]").click()
    assert "wrong credentials" in await page.locator(".problem").inner_text()
    await page.goto(console.url + "/jobs")
    assert page.url == f"{console.url}/login"


async def test_users_sign_in_with_a_password_or_the_token_and_out_again(
    console: Console, browser: Browser
) -> None:
    page = await sign_in(browser, console, VIEWER)
    assert await page.locator(".who span").inner_text() == f"{VIEWER} · viewer"
    await page.locator(".who button").click()
    await page.wait_for_url(f"{console.url}/login")
    await page.goto(console.url + "/")
    assert page.url == f"{console.url}/login"  # signed out: the session is gone

    form = page.locator("#token-login")
    await form.locator("input[name=name]").fill("nora")
    await form.locator("input[name=token]").fill(TOKEN)
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(f"{console.url}/")
    assert await page.locator(".who span").inner_text() == "nora (token) · operator"


async def test_the_overview_shows_the_figures_of_qm_sites_list_and_follows_them_live(
    console: Console,
    browser: Browser,
    engine: AsyncEngine,
    processor: RequestProcessor,
    qm: Qm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = console.settings
    await make_site(engine, settings, capacity=1, n_accounts=3)
    await make_site(engine, settings, "shop", capacity=2, n_accounts=1)
    async with engine.begin() as conn:
        await accounts.set_account_status(
            conn, site="board", username="user2@board", target=AccountStatus.BLOCKED
        )
    for job_id in ("job-1", "job-2", "job-3"):  # one runs, two wait
        assert await processor.process(start(settings, job_id)) == "replied"

    page = await sign_in(browser, console)
    result = await qm("sites", "list", "--json")
    assert result.exit_code == 0, result.output
    listed = {row["slug"]: row for row in map(json.loads, result.stdout.splitlines())}
    for slug, site in listed.items():
        row = page.locator(f"#sites tr[data-site='{slug}']")
        figures = {
            "running_count": site["running"],
            "capacity": site["capacity"],
            "waiting": site["waiting"],
            **{key: site[key] for key in site if key.startswith("accounts_")},
            "grants_last_minute": site["grants_last_minute"],
        }
        for field, value in figures.items():
            cell = row.locator(f"[data-field='{field}']")
            assert await cell.inner_text() == str(value), (slug, field)
    assert listed["board"]["running"] == 1 and listed["board"]["waiting"] == 2
    assert listed["board"]["accounts_blocked"] == 1
    monkeypatch.setenv("QM_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    top = await qm("top", "--json")  # `qm top` reads the same figures
    assert top.exit_code == 0, top.output
    for site in json.loads(top.stdout)["sites"]:
        for key in ("running", "capacity", "waiting", "accounts_ready", "accounts_blocked"):
            assert site[key] == listed[site["slug"]][key]
    outbox = await page.locator("#outbox [data-field='rows_waiting']").inner_text()
    assert int(outbox) == json.loads(top.stdout)["outbox"]["rows_waiting"]
    await screenshot(page, "console-overview", tmp_path)
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await screenshot(page, "console-overview-phone", tmp_path)
    # on a phone the page is as wide as the screen: wide tables scroll inside their box
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390

    # the page follows the database without a reload (server-sent events)
    async with engine.begin() as conn:
        await accounts.set_account_status(
            conn, site="shop", username="user0@shop", target=AccountStatus.INACTIVE
        )
    inactive = page.locator("#sites tr[data-site='shop'] [data-field='accounts_inactive']")

    async def followed() -> bool:
        return await inactive.inner_text() == "1"

    await eventually(followed, timeout=10)
    assert await page.locator("#live").get_attribute("class") == "live on"


async def test_a_job_page_shows_its_place_in_line_why_it_waits_and_its_grants(
    console: Console,
    browser: Browser,
    engine: AsyncEngine,
    processor: RequestProcessor,
    tmp_path: Path,
) -> None:
    settings = console.settings
    await make_site(engine, settings, capacity=1, n_accounts=1)
    for job_id in ("job-1", "job-2", "nightly/job-3@board:1"):  # an id may hold / : @
        assert await processor.process(start(settings, job_id)) == "replied"

    page = await sign_in(browser, console)
    await page.goto(console.url + "/jobs?site=board&status=QUEUED")
    assert await page.locator("#jobs tbody tr").count() == 2
    await page.locator("#jobs a", has_text="job-3").click()
    await page.wait_for_url("**/jobs/nightly/job-3*")
    assert "nightly/job-3@board:1" in await page.locator("h1").inner_text()
    assert await page.locator("#position").inner_text() == "2"
    reasons = await page.locator("#waits-because").inner_text()
    assert "1 job(s) of its site wait ahead of it" in reasons
    assert "at capacity (1 running of 1)" in reasons
    await screenshot(page, "console-job", tmp_path)

    await page.goto(console.url + "/jobs/job-1")
    assert await page.locator("#job-status").inner_text() == "RUNNING"
    grants = page.locator("#grants tbody tr")
    assert await grants.count() == 1
    assert "user0@board" in await grants.inner_text()
    assert await page.locator("#revoke button").count() == 1  # an operator may revoke it


async def test_qm_run_console_serves_sign_in_and_refuses_every_page_until_sign_in_is_set(
    topics: Settings, tmp_path: Path, qm: Qm
) -> None:
    help_text = (await qm("run", "--help")).stdout
    assert "console" in help_text

    configured = console_settings(topics, tmp_path / "users")
    with QmProcess(configured, "console") as process:
        url = f"http://127.0.0.1:{configured.console_port}"

        async def serving() -> bool:
            assert process.proc is not None and process.proc.poll() is None, process.output()
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(url + "/login")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(serving, timeout=30)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).headers["location"] == "/login"
            login = await client.get("/login")
            assert "default-src 'self'" in login.headers["content-security-policy"]
            assert "/static/console.css" in login.text
            assert (await client.get("/static/console.js")).status_code == 200
            signed = await client.post(
                "/login",
                data={"csrf": client.cookies.get("qm_console") and _csrf(login.text),
                      "name": OPERATOR, "password": PASSWORD},
            )  # fmt: skip
            assert signed.status_code == 303 and signed.headers["location"] == "/"
            assert (await client.get("/")).status_code == 200

    unconfigured = topics.model_copy(update={"console_port": configured.console_port})
    with QmProcess(unconfigured, "console") as process:
        url = f"http://127.0.0.1:{unconfigured.console_port}"

        async def refusing() -> bool:
            assert process.proc is not None and process.proc.poll() is None, process.output()
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(url + "/")).status_code == 503
            except httpx.TransportError:
                return False

        await eventually(refusing, timeout=30)
        async with httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/login", "/jobs", "/sites"):
                answer = await client.get(path)
                assert answer.status_code == 503 and "no way to sign in" in answer.text, path


def _csrf(html: str) -> str:
    """The CSRF token of a page's first form."""
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


async def test_a_sites_page_shows_its_rewrites_and_webhook_and_seeds_their_state_and_reasons(
    console: Console, browser: Browser, engine: AsyncEngine
) -> None:
    settings = console.settings
    await make_site(engine, settings, n_accounts=1)
    url = "https://hooks.example.com/deliver/abc123"
    async with engine.begin() as conn:
        await domains.add_rewrite(
            conn, site="board", from_host="old.example", to_host="board.example.com"
        )
        await captures.set_site_webhook(
            conn, "board", webhook_shown(url), SecretBox.from_settings(settings).seal(url)
        )
        for n in range(3):
            await seeds.add_seed(conn, site="board", url=f"https://board.example.com/{n}",
                                 interval_seconds=3600, priority=n)  # fmt: skip
        await seeds.set_seed_status(
            conn, site="board", seed="https://board.example.com/0", target=SeedStatus.DISABLED,
            reason="gone for good",
        )  # fmt: skip

    page = await sign_in(browser, console)
    await page.goto(console.url + "/sites")
    await page.locator("#site-list a", has_text="board").click()
    assert "old.example" in await page.locator("#rewrites").inner_text()
    assert await page.locator("#webhook").inner_text() == "https://hooks.example.com/…"
    assert "user0@board" in await page.locator("#accounts").inner_text()

    await page.goto(console.url + "/seeds?site=board")
    rows = page.locator("#seeds tbody tr")
    assert await rows.count() == 3
    assert "gone for good" in await page.locator("#seeds tr", has_text="/0").inner_text()
    await page.goto(console.url + "/seeds?site=board&status=DISABLED")
    assert await rows.count() == 1
    await page.goto(console.url + "/seeds?site=board&due=1")
    assert await rows.count() == 2  # the disabled one is never due
