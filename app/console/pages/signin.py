"""Signing in (operator token or user and password) and out."""

from __future__ import annotations

import asyncio
import secrets
import time

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app.console.auth import Identity, UsersFileError
from app.console.web import CSRF_FIELD, checked_form, console_state, render, text_field


async def login_page(request: Request) -> Response:
    if getattr(request.state, "identity", None) is not None:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html", problem=None)


async def login(request: Request) -> Response:
    """Check the credentials; a new session (and CSRF token) for who they name."""
    form = await checked_form(request)
    state = console_state(request)
    auth = state.auth
    address = request.client.host if request.client else "-"
    if state.throttle.refuses(address, time.monotonic()):
        return render(request, "login.html", status_code=429,
                      problem="too many failed sign-ins: wait a minute")  # fmt: skip
    found: Identity | None = None
    via = "token"
    token = text_field(form, "token", limit=1000)
    name = text_field(form, "name", limit=64)
    try:
        if token:
            found = auth.by_token(token, name)
        elif name:
            via = "password"
            password = form.get("password")
            # scrypt takes tens of milliseconds on purpose: off the event loop the pages serve on
            given = password if isinstance(password, str) else ""
            found = await asyncio.to_thread(auth.by_password, name, given)
    except (UsersFileError, OSError):
        return render(request, "login.html", status_code=503,
                      problem="the users file cannot be read; see the console's log")  # fmt: skip
    if found is None:
        state.throttle.failed(address, time.monotonic())
        return render(request, "login.html", status_code=401, problem="wrong credentials")
    request.session.clear()  # a new session: nothing from before the sign-in carries over
    request.session.update({**auth.session(found, via), CSRF_FIELD: secrets.token_urlsafe(32)})
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    await checked_form(request)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


routes = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
