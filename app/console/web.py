"""What every page and action of the console shares: its state, who is signed in, rendering,
the CSRF check of a form, confirmation, and the transaction an action runs in."""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse

from app.console.auth import Authenticator, Identity, Throttle
from app.core.transaction import Tx, TxServices
from app.overview import DeadLetters
from app.settings import Settings
from app.store import Database

if TYPE_CHECKING:
    from app.crypto import SecretBox

T = TypeVar("T")
CSRF_FIELD = "csrf"


@dataclass
class ConsoleState:
    """What the console's requests share: settings, database, dead-letter counts, sign-in."""

    settings: Settings
    db: Database
    secret_box: Callable[[], SecretBox]
    dead: DeadLetters = field(default_factory=DeadLetters)
    throttle: Throttle = field(default_factory=Throttle)
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set: live streams end

    @cached_property
    def auth(self) -> Authenticator:
        return Authenticator(self.settings)

    @cached_property
    def templates(self) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("app.console", "templates"),
            autoescape=True,  # every value is escaped unless a template says otherwise
            undefined=jinja2.StrictUndefined,
        )
        env.filters["age"] = age
        env.filters["when"] = when
        return env


def console_state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def identity(request: Request) -> Identity:
    """Who made the request (the sign-in middleware let it through)."""
    found: Identity = request.state.identity
    return found


def age(seconds: float | None) -> str:
    """A duration as `qm top` shows it: 12s, 4.5m, 1.2h."""
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def when(value: datetime | int | None) -> str:
    """A time in UTC to the second (an int: epoch milliseconds of a record)."""
    if value is None:
        return ""
    if isinstance(value, int):
        value = datetime.fromtimestamp(value / 1000, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on its first page); every form posts it back."""
    token = request.session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return token


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page: ``template`` with who is signed in, the CSRF token and ``context``."""
    env = console_state(request).templates
    html = env.get_template(template).render(
        request=request,
        me=getattr(request.state, "identity", None),
        csrf=csrf_token(request),
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)


async def checked_form(request: Request) -> FormData:
    """The posted form, refused (403) unless it carries the session's CSRF token."""
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    expected = request.session.get(CSRF_FIELD)
    if (
        not isinstance(sent, str)
        or not isinstance(expected, str)
        or not hmac.compare_digest(sent.encode(), expected.encode())
    ):
        raise HTTPException(
            403, "refused: the form's CSRF token is missing or stale; reload the page"
        )
    return form


async def action_form(request: Request) -> FormData:
    """An action's form: the CSRF token checked, and only for the operator role."""
    form = await checked_form(request)
    if not identity(request).may_act:
        raise HTTPException(403, "refused: your role is viewer; acting needs the operator role")
    return form


def text_field(form: FormData, name: str, *, limit: int = 400, default: str = "") -> str:
    """A text field of a form, stripped; 400 if it is longer than ``limit``."""
    value = form.get(name, default)
    if not isinstance(value, str) or len(value) > limit:
        raise HTTPException(400, f"{name} must be text of at most {limit} characters")
    return value.strip()


def confirmed(form: FormData) -> bool:
    """Whether the operator confirmed the action (the confirmation page posts ``confirmed``)."""
    return form.get("confirmed") == "yes"


def confirm(
    request: Request, *, title: str, what: str, fields: dict[str, str], **context: Any
) -> HTMLResponse:
    """The confirmation page of an action: what it will do, and the same form to post again."""
    return render(
        request, "confirm.html", title=title, what=what, fields=fields, action=request.url.path,
        **context,
    )  # fmt: skip


async def act(request: Request, work: Callable[[Tx], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction whose events name the signed-in operator."""
    state = console_state(request)
    services = TxServices(state.settings, state.secret_box())
    async with state.db.transaction() as conn:
        tx = Tx(conn, services, operator=identity(request).name)
        result = await work(tx)
        await tx.flush()
        return result


def done(request: Request, message: str, back: str, *, ok: bool = True) -> HTMLResponse:
    """What an action answers: what happened (or why nothing did), with a link back."""
    return render(
        request, "done.html", status_code=200 if ok else 409, message=message, back=back, ok=ok
    )
