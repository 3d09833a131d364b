"""The overview: `qm top`'s figures (app.overview), refreshed live by server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.console.web import (
    SESSION_ID,
    ConsoleState,
    console_state,
    identity,
    render,
    signed_in,
)
from app.overview import REPAIR_WINDOW_MINUTES, Snapshot, read_snapshot

# one stream lasts this long; the browser's EventSource then opens the next (bounded loops)
STREAM_SECONDS = 300.0


def _context(state: ConsoleState, snapshot: Snapshot) -> dict[str, Any]:
    return {"snap": snapshot, "dead": state.dead, "repair_minutes": REPAIR_WINDOW_MINUTES}


async def _snapshot(state: ConsoleState) -> Snapshot:
    """The overview's figures, read once a refresh for every page and stream."""
    return await state.snapshot.latest(
        lambda: read_snapshot(state.db), state.settings.console_refresh_seconds
    )


async def overview(request: Request) -> Response:
    state = console_state(request)
    return render(request, "overview.html", **_context(state, await _snapshot(state)))


class _Stream(StreamingResponse):
    """A stream that gives its slot back however it ends (even before its first event)."""

    def __init__(self, content: AsyncIterator[str], give_back: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()


async def stream(request: Request) -> Response:
    """The overview's figures as an HTML fragment every refresh (``event: overview``), while
    who opened it is still signed in; a few at a time a session (429 past that)."""
    state = console_state(request)
    template = state.templates.get_template("_overview.html")
    stop = state.stop
    session = request.session.get(SESSION_ID) or f"user {identity(request).name}"
    if not state.streams.take(str(session)):
        return PlainTextResponse("too many live streams open: close a tab", status_code=429)

    async def events() -> AsyncIterator[str]:
        ends = time.monotonic() + STREAM_SECONDS
        while time.monotonic() < ends and not stop.is_set():
            if signed_in(state, request) is None:  # signed out or removed since it opened
                return
            snapshot = await _snapshot(state)
            fragment = template.render(**_context(state, snapshot))
            data = "".join(f"data: {line}\n" for line in fragment.splitlines())
            yield f"event: overview\n{data}\n"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(state.settings.console_refresh_seconds):
                    await stop.wait()
            if await request.is_disconnected():
                return

    return _Stream(events(), lambda: state.streams.give_back(str(session)))


routes = [
    Route("/", overview, methods=["GET"]),
    Route("/overview/stream", stream, methods=["GET"]),
]
