"""Playwright for collectors: a browser context that starts from the account's session and hands
its state back when the work is done, so the next holder of the account starts logged in.

    async with client.job(site="board") as job:
        async with job.browser_context(browser, on_dead_session=log_in) as context:
            page = await context.new_page()
            ...

See docs/sessions.md for the merge rules the uploaded state goes through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol

from playwright.async_api import Browser, BrowserContext

from app.sdk.errors import InvalidArgument, SessionDead
from app.sdk.grants import Session
from app.sdk.logs import sdk_logger
from schemas.sessions import browser_snapshot

log = sdk_logger(__name__)

Relogin = Callable[[BrowserContext], Awaitable[None]]
DeadSessionPolicy = Relogin | Literal["fail", "block", "ignore"]
CHECK_TIMEOUT_MS = 30_000


class Job(Protocol):
    """What the browser helper asks of a job (``app.sdk.job.Job`` is one)."""

    @property
    def job_id(self) -> str: ...

    @property
    def session(self) -> Session | None: ...

    def blocked(self, reason: str, cooldown_seconds: int | None = None) -> None: ...

    async def upload_session(self, state: dict[str, Any]) -> int: ...


@asynccontextmanager
async def browser_context(
    job: Job,
    browser: Browser,
    *,
    check_url: str | None = None,
    on_dead_session: DeadSessionPolicy = "fail",
    upload_on_error: bool = True,
    indexed_db: bool = False,
    **context_options: Any,
) -> AsyncIterator[BrowserContext]:
    """A new context of ``browser`` holding the job's granted session (``context_options`` go to
    ``browser.new_context``); its state is handed back to Quartermaster on the way out.

    With a ``check_url`` (the site's ``session_check_url`` by default), the session is checked
    before the body runs; a dead one goes to ``on_dead_session``: an async function that logs in
    within the context (the session is checked again after it), ``"block"`` (the job ends
    ``blocked``), ``"fail"`` (the job ends ``failed``), both raising ``SessionDead``, or
    ``"ignore"`` (no check). The state is handed back on a clean exit, and after an
    exception too (cookies set before the failure are kept) unless ``upload_on_error=False``.
    ``indexed_db=True`` records IndexedDB as well.
    """
    if "storage_state" in context_options:
        raise InvalidArgument(
            "job.browser_context", ["storage_state: it starts from the granted session; drop it"]
        )
    if not callable(on_dead_session) and on_dead_session not in ("fail", "block", "ignore"):
        raise InvalidArgument(
            "job.browser_context",
            ["on_dead_session: an async function that logs in, 'fail', 'block' or 'ignore'"],
        )
    started = job.session.state() if job.session is not None else None
    context = await browser.new_context(storage_state=started, **context_options)  # type: ignore[arg-type]
    try:
        if check_url is not None and on_dead_session != "ignore":
            await _ensure_live(job, context, check_url, on_dead_session)
        yield context
    except Exception:  # a cancellation passes by: the browser is not asked for anything then
        if upload_on_error:
            await _hand_back_after_error(job, context, started, indexed_db)
        raise
    else:
        await _hand_back(job, context, started, indexed_db)
    finally:
        await context.close()


async def session_live(context: BrowserContext, check_url: str) -> bool:
    """True when ``check_url`` answers 2xx to the context's cookies, without a redirect."""
    response = await context.request.get(check_url, max_redirects=0, timeout=CHECK_TIMEOUT_MS)
    try:
        return response.ok
    finally:
        await response.dispose()


async def _ensure_live(
    job: Job, context: BrowserContext, check_url: str, on_dead: DeadSessionPolicy
) -> None:
    if await session_live(context, check_url):
        log.info("session_live", job_id=job.job_id)
        return
    log.info(
        "session_dead", job_id=job.job_id, policy=on_dead if isinstance(on_dead, str) else "relogin"
    )
    if on_dead == "block":
        job.blocked("session_dead")
        raise SessionDead(job.job_id, "the session is dead (the job ends blocked)")
    if isinstance(on_dead, str):
        raise SessionDead(job.job_id, "the session is dead")
    await on_dead(context)
    if not await session_live(context, check_url):
        raise SessionDead(job.job_id, "the session is still dead after logging in")


async def _hand_back(
    job: Job, context: BrowserContext, started: dict[str, Any] | None, indexed_db: bool
) -> None:
    """Upload the context's state (sealed, merged at once), with what the browser dropped since
    ``started`` as deletions. Raises ``SessionRejected`` when the session would be over its
    bounds, another ``QuartermasterError`` when the upload was not taken (a lost lease)."""
    current = await context.storage_state(indexed_db=indexed_db)
    snapshot = browser_snapshot(started, dict(current), indexed_db=indexed_db)
    version = await job.upload_session(snapshot)
    log.info(
        "browser_state_handed_back",
        job_id=job.job_id,
        version=version,
        cookies=len(snapshot["cookies"]),
        origins=len(snapshot["origins"]),
    )


async def _hand_back_after_error(
    job: Job, context: BrowserContext, started: dict[str, Any] | None, indexed_db: bool
) -> None:
    """As ``_hand_back``, but a browser that cannot answer any more does not hide the body's error."""
    try:
        await _hand_back(job, context, started, indexed_db)
    except Exception as exc:  # noqa: BLE001 - the body's own exception is the one to raise
        log.warning("browser_state_lost", job_id=job.job_id, error_class=type(exc).__name__)
