"""The console's Starlette application: its middleware (security headers, the signed session,
sign-in required for every page) and the routes of every page, assembled here."""

from __future__ import annotations

import secrets

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.console.auth import Identity
from app.console.pages import (
    accounts,
    captures,
    dead_letters,
    jobs,
    overview,
    seeds,
    signin,
    sites,
)
from app.console.web import ConsoleState, render

SESSION_COOKIE = "qm_console"
SESSION_SECONDS = 12 * 3600
# pages anybody may load: the sign-in page and the stylesheet and script it uses
PUBLIC = ("/login", "/static/")
HEADERS = [
    # every asset is the console's own: no CDN, no inline script, no framing
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Adds ``HEADERS`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class RequireSignIn:
    """No page without a signed-in user: the trusted header (when configured) or the session
    names one, else a GET goes to the sign-in page and anything else is refused (401)."""

    def __init__(self, app: ASGIApp, state: ConsoleState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response = self._refusal(request)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        path = request.url.path
        if path.startswith("/static/"):
            return None
        auth = self.state.auth
        if not auth.configured:
            return render(request, "unconfigured.html", status_code=503)
        found = self._identity(request)
        request.state.identity = found
        if found is not None or path in PUBLIC:
            return None
        if request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("sign in first", status_code=401)

    def _identity(self, request: Request) -> Identity | None:
        header = self.state.settings.console_trusted_header
        if header is not None:
            named = self.state.auth.by_header(request.headers.get(header))
            if named is not None:
                return named
        if "user" not in request.session:
            return None
        found = self.state.auth.by_session(request.session)
        if found is None:  # the user left the users file, or the token changed: signed out
            request.session.clear()
        return found


async def _refused(request: Request, exc: Exception) -> Response:
    """An HTTP error as a page (the console's own words, never a traceback)."""
    assert isinstance(exc, HTTPException)
    return render(request, "done.html", status_code=exc.status_code, message=exc.detail,
                  back=request.headers.get("referer") or "/", ok=False)  # fmt: skip


def build_app(state: ConsoleState) -> Starlette:
    """The console for ``state``: every route, behind the middleware above."""
    settings = state.settings
    key = settings.console_session_secret
    routes = [
        *signin.routes,
        *overview.routes,
        *sites.routes,
        *accounts.routes,
        *jobs.routes,
        *seeds.routes,
        *captures.routes,
        *dead_letters.routes,
        Mount("/static", StaticFiles(packages=[("app.console", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=key.get_secret_value() if key else secrets.token_urlsafe(32),
                session_cookie=SESSION_COOKIE,
                max_age=SESSION_SECONDS,
                same_site="strict",
                https_only=settings.console_secure_cookie,
            ),
            Middleware(RequireSignIn, state=state),
        ],
        exception_handlers={HTTPException: _refused},
    )
    app.state.console = state
    return app
