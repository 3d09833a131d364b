"""The console is safe by default: CSRF on every action, viewers see but never act, a trusted
header only when configured, and no secret, cookie value or token on any page or response."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import Route

from app.console.app import build_app
from app.console.live import STREAMS_PER_SESSION
from app.console.web import ConsoleState
from app.crypto import SecretBox
from app.errors import InvalidMessage
from app.settings import Settings
from app.store import Database, captures, seeds, sessions
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
from tests.support.waiting import eventually
from workers.requests import RequestProcessor

WEBHOOK_SECRET = "canary-webhook-path-5e1"
SESSION_COOKIE_VALUE = "canary-session-cookie-77"
DLT_PASSWORD = "canary-dlt-password-0b"
MAX_PAGES = 80
# sealed values and hashes: not one of them, in any encoding, on a page
SEALED = (
    "SELECT secret FROM accounts",
    "SELECT webhook_sealed FROM sites",
    "SELECT lease_secret_hash FROM jobs",
    "SELECT storage_state FROM sessions",
)
URL_CANARIES = [f"canary-url-{n}-{n * 7919:05d}" for n in range(5)]
PROXY_SECRET = "canary-proxy-secret-3d9e-5a71-b2c8-0f46"


def _routes(console: Console, engine: AsyncEngine, method: str) -> list[Route]:
    """The console's routes answering ``method``."""
    settings = console.settings
    state = ConsoleState(settings, Database(engine), lambda: SecretBox.from_settings(settings))
    return [
        route
        for route in build_app(state).routes
        if isinstance(route, Route) and route.methods and method in route.methods
    ]


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
    posts = [
        route.path_format.format(slug="board", action="block", job_id="job-1", capture_id="cap-1",
                          topic=console.settings.topic("requests.dlt"))
        for route in _routes(console, engine, "POST")
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
    settings = console_settings(
        topics,
        tmp_path / "users",
        console_trusted_header="X-Auth-User",
        console_trusted_proxy_secret=SecretStr(PROXY_SECRET),
    )
    async for running in serve_console(settings):
        yield running


async def test_a_trusted_header_signs_in_only_where_it_is_configured(
    proxied: Console, console: Console, browser: Browser
) -> None:
    headers = {"X-Auth-User": "pat", "X-Qm-Proxy-Secret": PROXY_SECRET}
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


async def test_a_trusted_header_counts_only_with_the_proxy_secret_and_only_once(
    proxied: Console,
) -> None:
    async with httpx.AsyncClient(base_url=proxied.url) as client:
        # a peer that reaches the port directly names itself: nobody
        for secret in (None, "not-the-proxy-secret"):
            sent = {"X-Auth-User": OPERATOR} | ({"X-Qm-Proxy-Secret": secret} if secret else {})
            answer = await client.get("/jobs", headers=sent)
            assert answer.status_code == 303 and answer.headers["location"] == "/login", secret
        # a proxy that appends: the client's own header comes first, then the proxy's
        twice = [("X-Auth-User", OPERATOR), ("X-Auth-User", "pat"),
                 ("X-Qm-Proxy-Secret", PROXY_SECRET)]  # fmt: skip
        answer = await client.get("/jobs", headers=twice)
        assert answer.status_code == 400 and "twice" in answer.text
        answer = await client.get(
            "/jobs", headers={"X-Auth-User": "pat", "X-Qm-Proxy-Secret": PROXY_SECRET}
        )
        assert answer.status_code == 200 and "pat · viewer" in answer.text
        assert PROXY_SECRET not in answer.text


async def test_an_error_page_links_home_never_to_the_referer(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url) as client:
        for path in ("/static/missing.css", "/static/nothing"):
            answer = await client.get(path, headers={"Referer": "javascript:alert(1)//evil"})
            assert answer.status_code == 404, path
            assert "evil" not in answer.text and 'href="/"' in answer.text, path


def _users_hashes(users: Path) -> list[str]:
    """The scrypt hashes of the users file."""
    lines = users.read_text().splitlines()
    return [line.split(":", 2)[2] for line in lines if line and not line.startswith("#")]


def _encodings(blob: bytes) -> list[str]:
    """How a sealed value or a hash could show on a page: hex, base64 (standard and URL-safe)."""
    return [blob.hex(), base64.b64encode(blob).decode(), base64.urlsafe_b64encode(blob).decode()]


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
        # URLs holding a password or a presigned query: shown without them
        await seeds.add_seed(conn, site="board", interval_seconds=60, priority=0,
                             url=f"https://crawler:{URL_CANARIES[0]}@board.example.com/list"
                             f"?page=2&token={URL_CANARIES[1]}")  # fmt: skip
        await conn.execute(
            text("UPDATE captures SET url = :url, storage_uri = :uri WHERE id = 'cap-1'"),
            {"url": f"https://u:{URL_CANARIES[2]}@board.example.com/items/1",
             "uri": f"https://bucket.example.com/cap-1.html?X-Amz-Signature={URL_CANARIES[3]}"},
        )  # fmt: skip
        await conn.execute(
            text("UPDATE sites SET session_check_url = :url WHERE slug = 'board'"),
            {"url": f"https://board.example.com/me?key={URL_CANARIES[4]}"},
        )
    value = json.dumps({"type": "job.start", "password": DLT_PASSWORD}).encode()
    await write_dead_letters(
        settings, settings.topic("requests.dlt"), [Letter(b"job-7", value, InvalidMessage("bad"))]
    )
    sealed: list[bytes] = []
    async with engine.connect() as conn:
        for sql in SEALED:
            sealed += [bytes(row[0]) for row in (await conn.execute(text(sql))).all() if row[0]]
    assert len(sealed) >= 4
    hashes = _users_hashes(Path(str(settings.console_users_file)))
    salts_and_keys = [part for stored in hashes for part in stored.split("$")[4:]]
    return [CANARY, TOKEN, PASSWORD, SESSION_SECRET, WEBHOOK_SECRET, SESSION_COOKIE_VALUE,
            DLT_PASSWORD, lease["lease_secret"], *URL_CANARIES, *hashes, *salts_and_keys,
            *(text for blob in sealed for text in _encodings(blob))]  # fmt: skip


async def _crawl(page: Page, base: str) -> dict[str, str]:
    """Every page reachable by a link from the overview, and the answer to each form posted
    once (a confirmation or a preview: nothing is confirmed): their HTML and headers by
    address."""
    seen: dict[str, str] = {}
    queue = ["/", "/jobs/no-such-job", "/captures/no-such-capture", "/static/no-such-file"]
    while queue and len(seen) < MAX_PAGES:
        path = queue.pop(0)
        if path in seen:
            continue
        answer = await page.goto(base + path)
        assert answer is not None
        seen[path] = await page.content() + json.dumps(await answer.all_headers())
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
            seen[f"POST {action} from {path}"] = await answer.text() + json.dumps(answer.headers)
    assert not queue or all(path in seen for path in queue), "the crawl stopped at MAX_PAGES"
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
    assert "X-Amz-Signature=…" in bodies["/captures/cap-1"]  # a presigned link: its names only
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    async with httpx.AsyncClient(base_url=console.url, cookies=cookies) as client:
        async with client.stream("GET", "/overview/stream") as stream:
            first = json.dumps(dict(stream.headers))
            async for chunk in stream.aiter_text():
                first += chunk
                if "\n\n" in first:
                    break
        bodies["/overview/stream"] = first
    assert "data-site=" in first
    visited = [key.split("?")[0] for key in bodies if not key.startswith("POST ")]
    for route in _routes(console, engine, "GET"):  # every page the console has was read
        assert any(route.path_regex.match(path) for path in visited), route.path

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
        assert refused.status_code == 429 and "too many sign-ins" in refused.text


async def test_sign_ins_sent_in_parallel_are_throttled_before_they_are_checked(
    console: Console,
) -> None:
    async with httpx.AsyncClient(base_url=console.url, timeout=60) as client:
        page = (await client.get("/login")).text
        marker = 'name="csrf" value="'
        start = page.index(marker) + len(marker)
        form = {"csrf": page[start : page.index('"', start)], "name": OPERATOR,
                "password": "wrong"}  # fmt: skip
        answers = await asyncio.gather(*(client.post("/login", data=form) for _ in range(16)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [401] * 10 + [429] * 6, statuses


@pytest.mark.parametrize("name", ["eve\nmallory", "eve\u202eyllom"])
async def test_a_name_that_is_not_printable_text_is_refused_at_sign_in(
    console: Console, name: str
) -> None:
    async with httpx.AsyncClient(base_url=console.url) as client:
        page = (await client.get("/login")).text
        marker = 'name="csrf" value="'
        start = page.index(marker) + len(marker)
        form = {"csrf": page[start : page.index('"', start)], "name": name, "token": TOKEN}
        answer = await client.post("/login", data=form)
    assert answer.status_code == 400 and "printable" in answer.text


async def _sign_in_client(client: httpx.AsyncClient, name: str = VIEWER) -> str:
    """Sign ``client`` in with the users file's password; the session's CSRF token."""
    page = (await client.get("/login")).text
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    form = {"csrf": page[start : page.index('"', start)], "name": name, "password": PASSWORD}
    assert (await client.post("/login", data=form)).status_code == 303
    page = (await client.get("/jobs")).text
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


async def _events_until_closed(client: httpx.AsyncClient, then: Any) -> int:
    """Read the live stream, doing ``then`` after its first event; the events read before the
    console closed it (a stream that does not close fails the test)."""
    seen = 0
    async with asyncio.timeout(15):
        async with client.stream("GET", "/overview/stream") as stream:
            assert stream.status_code == 200
            async for chunk in stream.aiter_text():
                seen += chunk.count("event: overview")
                if seen == 1 and "event: overview" in chunk:
                    await then()
    return seen


async def test_a_live_stream_ends_when_its_user_leaves_the_users_file(console: Console) -> None:
    users = Path(str(console.settings.console_users_file))
    async with httpx.AsyncClient(base_url=console.url, timeout=30) as client:
        await _sign_in_client(client, VIEWER)

        async def remove() -> None:
            _remove_user(users, VIEWER)

        assert await _events_until_closed(client, remove) >= 1


async def test_a_live_stream_ends_when_its_session_signs_out(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url, timeout=30) as client:
        csrf = await _sign_in_client(client, VIEWER)
        cookies = dict(client.cookies)

        async def sign_out() -> None:
            async with httpx.AsyncClient(base_url=console.url, cookies=cookies) as other:
                assert (await other.post("/logout", data={"csrf": csrf})).status_code == 303

        assert await _events_until_closed(client, sign_out) >= 1
        # the cookie kept from before the sign-out is nobody now
        assert (await client.get("/jobs")).status_code == 303


async def test_a_session_holds_a_few_live_streams_at_most(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url, timeout=30) as client:
        await _sign_in_client(client, VIEWER)
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(STREAMS_PER_SESSION):
                opened = await streams.enter_async_context(client.stream("GET", "/overview/stream"))
                assert opened.status_code == 200
            async with client.stream("GET", "/overview/stream") as refused:
                assert refused.status_code == 429
                assert "too many live streams" in (await refused.aread()).decode()
        async with httpx.AsyncClient(base_url=console.url, timeout=30) as other:
            await _sign_in_client(other, OPERATOR)  # another session has its own
            async with other.stream("GET", "/overview/stream") as opened:
                assert opened.status_code == 200

        async def answers_again() -> bool:  # the closed streams gave their slots back
            async with client.stream("GET", "/overview/stream") as again:
                return again.status_code == 200

        await eventually(answers_again, timeout=10)


def _filled(console: Console, route: Route) -> str:
    """A route's path with its parameters filled in."""
    topic = console.settings.topic("requests.dlt")
    return route.path_format.format(slug="board", action="block", job_id="job-1",
                                    capture_id="cap-1", topic=topic)  # fmt: skip


async def test_every_route_refuses_whoever_is_not_signed_in(
    console: Console, engine: AsyncEngine
) -> None:
    await make_site(engine, console.settings)
    async with httpx.AsyncClient(base_url=console.url) as client:
        for route in _routes(console, engine, "GET"):
            path = _filled(console, route)
            answer = await client.get(path)
            if path == "/login":
                assert answer.status_code == 200
                continue
            assert answer.status_code == 303 and answer.headers["location"] == "/login", path
        for route in _routes(console, engine, "POST"):
            path = _filled(console, route)
            answer = await client.post(path, data={"confirmed": "yes", "reason": "x"})
            expected = 403 if path == "/login" else 401  # signing in checks CSRF first
            assert answer.status_code == expected, path
    assert await scalar(engine, "SELECT status::text FROM accounts") == "ACTIVE"


async def test_every_action_refuses_a_viewer(
    console: Console, browser: Browser, engine: AsyncEngine, processor: RequestProcessor
) -> None:
    await running_job(processor, engine, console.settings)
    page = await sign_in(browser, console, VIEWER)
    await page.goto(console.url + "/jobs")
    csrf = await csrf_of(page)
    actions = [_filled(console, route) for route in _routes(console, engine, "POST")]
    actions = [path for path in actions if path not in ("/login", "/logout")]
    assert len(actions) >= 6
    for path in actions:
        form = {"csrf": csrf, "confirmed": "yes", "reason": "x", "site": "board",
                "username": "user0@board"}  # fmt: skip
        answer = await page.request.post(console.url + path, form=form)
        assert answer.status == 403 and "operator role" in await answer.text(), path
    assert await scalar(engine, "SELECT status::text FROM jobs") == "RUNNING"
    assert await scalar(engine, "SELECT count(*) FROM accounts WHERE status = 'BLOCKED'") == 0
    assert await scalar(engine, "SELECT capacity FROM sites") > 0
