"""Browser sessions for real: Debian's Chromium driven by Playwright through the SDK's helper,
against a login site on loopback, with the real `qm` processes, Kafka and PostgreSQL.

These tests fail (never skip) when Chromium is missing: `make browser` installs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, async_playwright
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.kafka import sdk_client
from app.sdk import Job, SessionDead, SessionRejected
from app.settings import Settings
from app.store import accounts, sites
from tests.support.chromium import chromium_path
from tests.support.leasing import scalar
from tests.support.login_site import PASSWORD, USER, LoginSite
from tests.support.processes import QmProcess

SITE = "board"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium; a missing one fails the test, it does not skip it."""
    executable = chromium_path()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=executable)
        yield chromium
        await chromium.close()


@pytest.fixture
def login_site() -> Iterator[LoginSite]:
    with LoginSite() as site:
        yield site


@pytest.fixture
def server_overrides() -> dict[str, object]:
    """Settings of the `qm` processes that a test changes (by parametrizing this name)."""
    return {}


@pytest.fixture
async def server(
    topics: Settings,
    engine: AsyncEngine,
    login_site: LoginSite,
    server_overrides: dict[str, object],
) -> AsyncIterator[Settings]:
    """The `qm` processes, and a site whose session check is the login site's /api/me."""
    async with engine.begin() as conn:
        await sites.add_site(
            conn,
            slug=SITE,
            host="127.0.0.1",
            capacity=1,
            lease_seconds=60,
            session_check_url=login_site.url("/api/me"),
        )
        sealed = SecretBox.from_settings(topics).seal(PASSWORD)
        await accounts.add_account(conn, site=SITE, username=USER, sealed_secret=sealed)
    with QmProcess(topics, "all", **server_overrides) as process:
        yield topics
        assert process.proc is not None and process.proc.poll() is None


def logging_in(site: LoginSite, job: Job) -> Any:
    """The collector's login flow, for ``on_dead_session``: the form, then the welcome page."""

    async def log_in(context: BrowserContext) -> None:
        assert job.account is not None
        page = await context.new_page()
        await page.goto(site.url("/login"))
        await page.fill("input[name=user]", job.account.username)
        await page.fill("input[name=password]", job.account.secret.get_secret_value())
        await page.click("button")
        await page.wait_for_selector("#welcome")  # it sets cookie B and the localStorage entry
        await page.close()

    return log_in


async def visit(context: BrowserContext, url: str) -> tuple[str, str | None]:
    """Where the browser ended up, and what the page's localStorage greeting says."""
    page = await context.new_page()
    await page.goto(url)
    greeting = await page.evaluate("localStorage.getItem('greeting')")
    final = page.url
    await page.close()
    return final, greeting


def cookie_names(job: Job) -> set[str]:
    assert job.session is not None
    return {c["name"] for c in job.session.state()["cookies"]}


async def test_a_login_carries_over_to_the_next_job_and_a_logout_to_the_one_after(
    server: Settings, browser: Browser, login_site: LoginSite
) -> None:
    members = login_site.url("/members")
    async with sdk_client(server, collector="browser-test") as client:
        async with (
            client.job(site=SITE, wait_seconds=30) as job1,
            job1.browser_context(browser, on_dead_session=logging_in(login_site, job1)) as ctx,
        ):
            assert job1.session is None  # no session yet: the check failed and the login ran
            assert await visit(ctx, members) == (members, "hello")
        assert login_site.logins == 1

        async with client.job(site=SITE, wait_seconds=30) as job2:
            assert cookie_names(job2) == {"auth", "prefs"}
            async with job2.browser_context(browser) as ctx:  # a dead session would fail here
                assert await visit(ctx, members) == (members, "hello")
        assert login_site.logins == 1  # reached the members page without logging in again

        async with (
            client.job(site=SITE, wait_seconds=30) as job3,
            job3.browser_context(browser) as ctx,
        ):
            logout = login_site.url("/logout")
            assert await visit(ctx, logout) == (logout, None)

        async with client.job(site=SITE, wait_seconds=30) as job4:
            assert cookie_names(job4) == {"prefs"}  # auth deleted, B kept
            assert job4.session is not None and job4.session.state()["origins"] == []
            async with job4.browser_context(browser, on_dead_session="ignore") as ctx:
                assert await visit(ctx, members) == (login_site.url("/login"), None)

        with pytest.raises(SessionDead):
            async with (
                client.job(site=SITE, wait_seconds=30) as job5,
                job5.browser_context(browser),
            ):
                pass
        assert job5.status == "FAILED"
    assert login_site.logins == 1


async def test_a_dead_session_can_end_the_job_blocked(
    server: Settings, browser: Browser, engine: AsyncEngine
) -> None:
    async with sdk_client(server) as client:
        with pytest.raises(SessionDead):
            async with (
                client.job(site=SITE, wait_seconds=30) as job,
                job.browser_context(browser, on_dead_session="block"),
            ):
                pass
    assert job.status == "FAILED"
    assert await scalar(engine, "SELECT status FROM accounts") == "BLOCKED"
    assert await scalar(engine, "SELECT reason FROM jobs") == "blocked: session_dead"


@pytest.mark.parametrize("upload_on_error", [True, False])
async def test_cookies_set_before_a_failure_are_kept_unless_told_not_to(
    server: Settings, browser: Browser, login_site: LoginSite, upload_on_error: bool
) -> None:
    async with sdk_client(server) as client:
        with pytest.raises(RuntimeError, match="the crawl broke"):
            async with (
                client.job(site=SITE, wait_seconds=30) as job,
                job.browser_context(
                    browser,
                    on_dead_session=logging_in(login_site, job),
                    upload_on_error=upload_on_error,
                ),
            ):
                raise RuntimeError("the crawl broke")
        assert job.status == "FAILED"
        async with client.job(site=SITE, wait_seconds=30) as after:
            kept = after.session is not None and "auth" in cookie_names(after)
    assert kept is upload_on_error
    assert login_site.logins == 1


async def test_two_collectors_finishing_with_different_cookies_in_turn_keep_both(
    server: Settings, browser: Browser, login_site: LoginSite
) -> None:
    async with (
        sdk_client(server, collector="first") as first,
        first.job(site=SITE, wait_seconds=30) as job,
        job.browser_context(browser, on_dead_session="ignore") as ctx,
    ):
        await visit(ctx, login_site.url("/set/from_first"))
    # the second collector keeps a browser of its own and hands back only what it holds
    async with sdk_client(server, collector="second") as second:
        async with second.job(site=SITE, wait_seconds=30) as job:
            context = await browser.new_context()
            await visit(context, login_site.url("/set/from_second"))
            job.set_session_state(dict(await context.storage_state()))
            await context.close()
        async with second.job(site=SITE, wait_seconds=30) as job:
            assert cookie_names(job) == {"from_first", "from_second"}


@pytest.mark.parametrize("server_overrides", [{"session_max_cookies": 1}])
async def test_a_browser_state_over_the_session_bounds_is_refused_and_the_session_kept(
    server: Settings, browser: Browser, login_site: LoginSite, engine: AsyncEngine
) -> None:
    async with sdk_client(server) as client:
        with pytest.raises(SessionRejected, match="would hold 2 cookies; at most 1 are kept"):
            async with (
                client.job(site=SITE, wait_seconds=30) as job,
                job.browser_context(browser, on_dead_session=logging_in(login_site, job)),
            ):
                pass  # logged in: cookies A and B
    assert job.status == "FAILED"
    assert await scalar(engine, "SELECT count(*) FROM sessions") == 0


PUT_RECORD = """() => new Promise((done, failed) => {
    const open = indexedDB.open("app", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("kv");
    open.onerror = () => failed(open.error);
    open.onsuccess = () => {
        const tx = open.result.transaction("kv", "readwrite");
        tx.objectStore("kv").put("draft", "note");
        tx.oncomplete = () => { open.result.close(); done(true); };
    };
})"""
GET_RECORD = """() => new Promise((done) => {
    const open = indexedDB.open("app", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("kv");
    open.onsuccess = () => {
        const get = open.result.transaction("kv").objectStore("kv").get("note");
        get.onsuccess = () => { open.result.close(); done(get.result ?? null); };
    };
})"""
DROP_DATABASE = """() => new Promise((done) => {
    const drop = indexedDB.deleteDatabase("app");
    drop.onsuccess = () => done(true);
})"""


async def run_script(context: BrowserContext, url: str, script: str) -> Any:
    page = await context.new_page()
    await page.goto(url)
    result = await page.evaluate(script)
    await page.close()
    return result


async def test_indexed_db_recorded_by_one_job_is_there_for_the_next_until_one_drops_it(
    server: Settings, browser: Browser, login_site: LoginSite
) -> None:
    page = login_site.url("/login")
    options: dict[str, Any] = {"on_dead_session": "ignore"}
    async with sdk_client(server) as client:
        async with (
            client.job(site=SITE, wait_seconds=30) as job,
            job.browser_context(browser, indexed_db=True, **options) as ctx,
        ):
            assert await run_script(ctx, page, PUT_RECORD) is True
        async with (  # a job that does not record IndexedDB leaves the kept one alone
            client.job(site=SITE, wait_seconds=30) as job,
            job.browser_context(browser, **options) as ctx,
        ):
            assert await run_script(ctx, page, GET_RECORD) == "draft"
        async with (
            client.job(site=SITE, wait_seconds=30) as job,
            job.browser_context(browser, indexed_db=True, **options) as ctx,
        ):
            assert await run_script(ctx, page, GET_RECORD) == "draft"
            assert await run_script(ctx, page, DROP_DATABASE) is True
        async with (
            client.job(site=SITE, wait_seconds=30) as job,
            job.browser_context(browser, **options) as ctx,
        ):
            assert job.session is not None and job.session.state()["origins"] == []
            assert await run_script(ctx, page, GET_RECORD) is None
