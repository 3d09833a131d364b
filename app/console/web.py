"""What every page and action of the console shares: its state, who is signed in, rendering,
the CSRF check of a form, confirmation, and the transaction an action runs in."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import jinja2
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse

from app.console.auth import Authenticator, Identity, SignedOut, Throttle
from app.console.live import SharedSnapshot, StreamSlots
from app.core.transaction import Tx, TxServices
from app.overview import DeadLetters
from app.settings import Settings
from app.store import Database

if TYPE_CHECKING:
    from app.crypto import SecretBox

T = TypeVar("T")
CSRF_FIELD = "csrf"
SESSION_ID = "sid"  # the session's own id, made at sign-in: what signing out ends
SESSION_SECONDS = 12 * 3600
CHECKS = 2
# what the authenticating proxy sends beside the trusted header: QM_CONSOLE_TRUSTED_PROXY_SECRET
PROXY_SECRET_HEADER = "X-Qm-Proxy-Secret"


@dataclass
class ConsoleState:
    """What the console's requests share: settings, database, dead-letter counts, sign-in."""

    settings: Settings
    db: Database
    secret_box: Callable[[], SecretBox]
    dead: DeadLetters = field(default_factory=DeadLetters)
    throttle: Throttle = field(default_factory=Throttle)
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set: live streams end
    # password checks at once: each scrypt takes 32 MiB and a thread of the process's executor
    checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CHECKS))
    signed_out: SignedOut = field(default_factory=lambda: SignedOut(SESSION_SECONDS))
    snapshot: SharedSnapshot = field(default_factory=SharedSnapshot)
    streams: StreamSlots = field(default_factory=StreamSlots)

    @cached_property
    def session_key(self) -> str:
        """The key that signs the session cookie: the configured one, else one for this run."""
        key = self.settings.console_session_secret
        return key.get_secret_value() if key else secrets.token_urlsafe(32)

    @cached_property
    def auth(self) -> Authenticator:
        return Authenticator(self.settings, self.session_key)

    @cached_property
    def templates(self) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("app.console", "templates"),
            autoescape=True,  # every value is escaped unless a template says otherwise
            undefined=jinja2.StrictUndefined,
        )
        env.filters["age"] = age
        env.filters["when"] = when
        env.filters["url_id"] = url_id
        env.filters["url_shown"] = url_shown
        return env


def console_state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


class GivenTwice(ValueError):
    """A header the proxy sets came more than once."""


def signed_in(state: ConsoleState, request: Request) -> Identity | None:
    """Who the request is from: the user the trusted header names (on a request the proxy
    vouches for), else the one its session names while that still holds."""
    named = state.auth.by_header(_proxied_user(request, state.settings))
    if named is not None:
        return named
    if "user" not in request.session:
        return None
    session_id = request.session.get(SESSION_ID)
    found = None
    if isinstance(session_id, str) and not state.signed_out.holds(session_id, time.monotonic()):
        found = state.auth.by_session(request.session)
    if found is None:  # signed out, the user left the users file, or the token changed
        request.session.clear()
    return found


def _proxied_user(request: Request, settings: Settings) -> str | None:
    """The user the trusted header names, on a request the proxy vouches for with its secret;
    a header given twice is refused (which one a proxy appended cannot be told)."""
    header, secret = settings.console_trusted_header, settings.console_trusted_proxy_secret
    if header is None or secret is None:
        return None
    names = request.headers.getlist(header)
    sent = request.headers.getlist(PROXY_SECRET_HEADER)
    if len(names) > 1 or len(sent) > 1:
        raise GivenTwice(f"refused: {header} or {PROXY_SECRET_HEADER} given twice")
    if not names or not sent:
        return None
    if not hmac.compare_digest(sent[0].encode(), secret.get_secret_value().encode()):
        return None  # not from the proxy: whoever sent it may not name themselves
    return names[0]


def identity(request: Request) -> Identity:
    """Who made the request (the sign-in middleware let it through)."""
    found: Identity = request.state.identity
    return found


def url_id(value: object) -> str:
    """An id as one segment of a URL: every '/', '.', '?', '#' ... quoted, so that an id such as
    ``x/../victim`` names its own page, never another's."""
    return quote(str(value), safe="")


def url_shown(url: object) -> str:
    """A URL as a page shows it: no user information (it may hold a password) and no query value
    (a presigned link's signature, a token); scheme, host, path and the query's names stay."""
    if not url:
        return ""
    try:
        parts = urlsplit(str(url))
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(a URL that cannot be read)"
    user = "…@" if "@" in parts.netloc else ""
    names = (part.partition("=") for part in parts.query.split("&") if part)
    query = "&".join(f"{name}=…" if eq else name for name, eq, _ in names)
    return urlunsplit((parts.scheme, user + host, parts.path, query, ""))


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
    request: Request,
    *,
    title: str,
    what: str,
    action: str,
    fields: dict[str, str],
    **context: Any,
) -> HTMLResponse:
    """The confirmation page of an action: what it will do, and the same form to post again to
    ``action`` (built from quoted ids: the request's own path is decoded)."""
    return render(
        request, "confirm.html", title=title, what=what, fields=fields, action=action, **context
    )


async def act(request: Request, work: Callable[[Tx], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction whose events name the signed-in operator."""
    state = console_state(request)
    services = TxServices(state.settings, state.secret_box())
    async with state.db.transaction() as conn:
        tx = Tx(conn, services, operator=identity(request).name)
        result = await work(tx)
        await tx.flush()
        return result


@dataclass(frozen=True)
class Action:
    """A console action as its confirmation page shows it: ``title`` and ``what`` it does, the
    ``path`` its form posts to, the form's ``fields``, and the page to go ``back`` to."""

    title: str
    what: str
    path: str
    back: str
    fields: dict[str, str] = field(default_factory=dict)
    reason_field: bool = False


async def confirm_then_act(
    request: Request,
    form: FormData,
    action: Action,
    work: Callable[[Tx], Awaitable[T | None]],
    *,
    succeeded: Callable[[T], str],
    refused: str,
    ready: bool = True,
) -> HTMLResponse:
    """An action's one shape: its confirmation page until the operator confirmed (and the form
    is ``ready``), then ``work`` in one transaction naming the operator; what it did
    (``succeeded`` of its row) or, when it found nothing to change (None), why (``refused``)."""
    if not (ready and confirmed(form)):
        return confirm(request, title=action.title, what=action.what, action=action.path,
                       fields=action.fields, reason_field=action.reason_field)  # fmt: skip
    row = await act(request, work)
    if row is None:
        return done(request, refused, action.back, ok=False)
    return done(request, succeeded(row), action.back)


def done(request: Request, message: str, back: str, *, ok: bool = True) -> HTMLResponse:
    """What an action answers: what happened (or why nothing did), with a link back."""
    return render(
        request, "done.html", status_code=200 if ok else 409, message=message, back=back, ok=ok
    )
