"""Signing in (operator token or user and password) and out."""

from __future__ import annotations

import asyncio
import secrets
import time

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app.console.auth import NAME_CHARS, Identity, UsersFileError, valid_name
from app.console.web import (
    CSRF_FIELD,
    SESSION_ID,
    checked_form,
    console_state,
    render,
    text_field,
)


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
    token = text_field(form, "token", limit=1000)
    name = text_field(form, "name", limit=NAME_CHARS)
    if name and not valid_name(name):  # it goes into events' operator field
        return render(request, "login.html", status_code=400,
                      problem=f"a name is 1 to {NAME_CHARS} printable characters")  # fmt: skip
    if not state.throttle.attempt(address, time.monotonic()):
        return render(request, "login.html", status_code=429,
                      problem="too many sign-ins: wait a minute")  # fmt: skip
    found: Identity | None = None
    via = "token"
    try:
        if token:
            found = auth.by_token(token, name)
        elif name:
            via = "password"
            password = form.get("password")
            given = password if isinstance(password, str) else ""
            # scrypt takes tens of milliseconds and 32 MiB on purpose: off the event loop, and
            # a few at a time so that sign-ins cannot take the process's threads or memory
            async with state.checks:
                found = await asyncio.to_thread(auth.by_password, name, given)
    except (UsersFileError, OSError):
        return render(request, "login.html", status_code=503,
                      problem="the users file cannot be read; see the console's log")  # fmt: skip
    if found is None:
        return render(request, "login.html", status_code=401, problem="wrong credentials")
    state.throttle.succeeded(address)
    request.session.clear()  # a new session: nothing from before the sign-in carries over
    request.session.update({**auth.session(found, via), CSRF_FIELD: secrets.token_urlsafe(32),
                            SESSION_ID: secrets.token_urlsafe(16)})  # fmt: skip
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    await checked_form(request)
    session_id = request.session.get(SESSION_ID)
    if isinstance(session_id, str):  # its streams and any copy of its cookie end too
        console_state(request).signed_out.add(session_id, time.monotonic())
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


routes = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
