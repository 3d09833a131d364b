"""The console is safe by default: CSRF on every action, viewers see but never act, a trusted
header only when configured, and no secret, cookie value or token on any page or response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import Route

from app.console.app import build_app
from app.console.web import ConsoleState
from app.crypto import SecretBox
from app.errors import InvalidMessage
from app.settings import Settings
from app.store import Database, captures, sessions
from app.urls import webhook_shown
from tests.support.captures import running_job, submit
from tests.support.console import (
    OPERATOR,
    PASSWORD,
    SESSION_SECRET,
    TOKEN,
    VIEWER,
    Console,
    browser_fixture,  # noqa: F401 - the `browser` fixture
    console_fixture,  # noqa: F401 - the `console` fixture
    console_settings,
    serve_console,
    sign_in,
)
from tests.support.dead_letters import Letter, write_dead_letters
from tests.support.leasing import CANARY, make_site, scalar
from workers.requests import RequestProcessor

WEBHOOK_SECRET = "canary-webhook-path-5e1"
SESSION_COOKIE_VALUE = "canary-session-cookie-77"
DLT_PASSWORD = "canary-dlt-password-0b"
MAX_PAGES = 80


async def csrf_of(page: Page) -> str:
    return await page.locator("input[name=csrf]").first.get_attribute("value") or ""


async def test_an_action_without_the_csrf_token_is_refused_and_changes_nothing(
    console: Console, browser: Browser, engine: AsyncEngine
) -> None:
    await make_site(engine, console.settings)
    page = await sign_in(browser, console)
    fields = {"site": "board", "username": "user0@board", "reason": "x", "confirmed": "yes"}
    block = f"{console.url}/accounts/block"
    missing = await page.request.post(block, form=fields)
    wrong = await page.request.post(block, form={**fields, "csrf": "forged"})
    assert (missing.status, wrong.status) == (403, 403)
    assert "CSRF" in await missing.text()
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"

    right = await page.request.post(block, form={**fields, "csrf": await csrf_of(page)})
    assert right.status == 200  # the same form with the session's token acts
    assert await scalar(engine, "SELECT status::text FROM accounts") == "BLOCKED"


async def test_every_post_route_checks_the_csrf_token(
    console: Console, browser: Browser, engine: AsyncEngine
) -> None:
    await make_site(engine, console.settings)
    page = await sign_in(browser, console)
    state = ConsoleState(
        console.settings, Database(engine), lambda: SecretBox.from_settings(console.settings)
    )
    posts = [
        route.path_format.format(slug="board", action="block", job_id="job-1", capture_id="cap-1",
                          topic=console.settings.topic("requests.dlt"))
        for route in build_app(state).routes
        if isinstance(route, Route) and route.methods and "POST" in route.methods
    ]  # fmt: skip
    assert len(posts) >= 8
    for path in posts:
        answer = await page.request.post(console.url + path, form={"confirmed": "yes"})
        assert answer.status == 403, path
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"


async def test_a_viewer_sees_every_page_but_no_action_and_is_refused_one(
    console: Console, browser: Browser, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await running_job(processor, engine, console.settings)
    page = await sign_in(browser, console, VIEWER)
    for path in ("/accounts?site=board", "/jobs/job-1", "/sites/board"):
        await page.goto(console.url + path)
        assert await page.locator("main form[method=post]").count() == 0, path
    answer = await page.request.post(
        f"{console.url}/jobs/job-1/revoke",
        form={"reason": "x", "confirmed": "yes", "csrf": await csrf_of(page)},
    )
    assert answer.status == 403 and "operator role" in await answer.text()
    assert await scalar(engine, "SELECT status::text FROM jobs") == "RUNNING"


@pytest.fixture
async def proxied(topics: Settings, tmp_path: Path) -> AsyncIterator[Console]:
    settings = console_settings(topics, tmp_path / "users", console_trusted_header="X-Auth-User")
    async for running in serve_console(settings):
        yield running


async def test_a_trusted_header_signs_in_only_where_it_is_configured(
    proxied: Console, console: Console, browser: Browser
) -> None:
    headers = {"X-Auth-User": "pat"}
    context = await browser.new_context(extra_http_headers=headers)
    page = await context.new_page()
    await page.goto(proxied.url + "/jobs")
    assert page.url == f"{proxied.url}/jobs"
    assert await page.locator(".who span").inner_text() == "pat · viewer"
    await page.goto(console.url + "/jobs")  # not configured there: the header is nobody
    assert page.url == f"{console.url}/login"
    async with httpx.AsyncClient() as client:
        answer = await client.get(proxied.url + "/jobs", headers={"X-Auth-User": ""})
        assert answer.status_code == 303


async def _secrets_everywhere(
    settings: Settings, engine: AsyncEngine, processor: RequestProcessor
) -> list[str]:
    """Every kind of secret in the database and on the broker; the canaries to look for."""
    lease = await running_job(processor, engine, settings)  # accounts' secrets: CANARY-n
    assert await processor.process(submit(settings, "job-1", lease, "cap-1")) == "replied"
    box = SecretBox.from_settings(settings)
    url = f"https://hooks.example.com/{WEBHOOK_SECRET}"
    async with engine.begin() as conn:
        await captures.set_site_webhook(conn, "board", webhook_shown(url), box.seal(url))
        state = {"cookies": [{"name": "sid", "value": SESSION_COOKIE_VALUE}], "origins": []}
        account = await scalar(engine, "SELECT id FROM accounts ORDER BY id LIMIT 1")
        await sessions.save_session(conn, account, box.seal(json.dumps(state)), None)
    value = json.dumps({"type": "job.start", "password": DLT_PASSWORD}).encode()
    await write_dead_letters(
        settings, settings.topic("requests.dlt"), [Letter(b"job-7", value, InvalidMessage("bad"))]
    )
    return [CANARY, TOKEN, PASSWORD, SESSION_SECRET, WEBHOOK_SECRET, SESSION_COOKIE_VALUE,
            DLT_PASSWORD, lease["lease_secret"]]  # fmt: skip


async def _crawl(page: Page, base: str) -> dict[str, str]:
    """Every page reachable by a link from the overview, and the answer to each form posted
    once (a confirmation or a preview: nothing is confirmed): their HTML by address."""
    seen: dict[str, str] = {}
    queue = ["/"]
    while queue and len(seen) < MAX_PAGES:
        path = queue.pop(0)
        if path in seen:
            continue
        await page.goto(base + path)
        seen[path] = await page.content()
        links = await page.eval_on_selector_all(
            "a[href^='/']", "els => els.map(e => e.getAttribute('href'))"
        )
        queue += [link for link in links if link not in seen and not link.startswith("/static")]
        forms = await page.eval_on_selector_all(
            "main form[method=post]",
            "fs => fs.map(f => [f.getAttribute('action'),"
            " Object.fromEntries(new FormData(f).entries())])",
        )
        for action, fields in forms:
            answer = await page.request.post(base + action, form={**fields, "reason": "look"})
            seen[f"POST {action} from {path}"] = await answer.text()
    return seen


async def test_no_page_or_response_shows_a_secret_a_cookie_value_or_a_token(
    console: Console, browser: Browser, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    canaries = await _secrets_everywhere(console.settings, engine, processor)
    anonymous = await (await browser.new_context()).new_page()
    await anonymous.goto(console.url + "/")
    bodies = {"/login": await anonymous.content()}

    page = await sign_in(browser, console)
    bodies |= await _crawl(page, console.url)
    for needed in ("/sites/board", "/jobs/job-1", "/captures/cap-1", "/accounts", "/seeds"):
        assert needed in bodies, sorted(bodies)
    assert any(key.startswith(f"/dead-letters/{console.settings.topic('requests.dlt')}")
               for key in bodies)  # fmt: skip
    assert any(key.startswith("POST /dead-letters/") for key in bodies)  # the replay's preview
    assert "hooks.example.com" in bodies["/sites/board"]  # the webhook: scheme and host only

    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    async with httpx.AsyncClient(base_url=console.url, cookies=cookies) as client:
        async with client.stream("GET", "/overview/stream") as stream:
            first = ""
            async for chunk in stream.aiter_text():
                first += chunk
                if "\n\n" in first:
                    break
        bodies["/overview/stream"] = first
    assert "data-site=" in first
    canaries += list(cookies.values())
    for where, body in bodies.items():
        for canary in canaries:
            assert canary not in body, (where, canary[:6])


async def test_a_user_taken_out_of_the_users_file_is_signed_out_at_their_next_page(
    console: Console, browser: Browser
) -> None:
    page = await sign_in(browser, console, VIEWER)
    await page.goto(console.url + "/jobs")
    assert page.url == f"{console.url}/jobs"
    _remove_user(Path(str(console.settings.console_users_file)), VIEWER)
    await page.goto(console.url + "/jobs")
    assert page.url == f"{console.url}/login"


def _remove_user(users: Path, name: str) -> None:
    kept = [line for line in users.read_text().splitlines() if not line.startswith(f"{name}:")]
    users.write_text("".join(line + "\n" for line in kept))


async def test_failed_sign_ins_from_one_address_are_throttled(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as client:

        async def attempt(password: str) -> httpx.Response:
            page = (await client.get("/login")).text
            marker = 'name="csrf" value="'
            start = page.index(marker) + len(marker)
            csrf = page[start : page.index('"', start)]
            form = {"csrf": csrf, "name": OPERATOR, "password": password}
            return await client.post("/login", data=form)

        for _ in range(10):
            assert (await attempt("wrong")).status_code == 401
        refused = await attempt(PASSWORD)
        assert refused.status_code == 429 and "too many failed sign-ins" in refused.text
