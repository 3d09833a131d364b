"""The overview: `qm top`'s figures (app.overview), refreshed live by server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from app.console.web import ConsoleState, console_state, render
from app.overview import REPAIR_WINDOW_MINUTES, Snapshot, read_snapshot

# one stream lasts this long; the browser's EventSource then opens the next (bounded loops)
STREAM_SECONDS = 300.0


def _context(state: ConsoleState, snapshot: Snapshot) -> dict[str, Any]:
    return {"snap": snapshot, "dead": state.dead, "repair_minutes": REPAIR_WINDOW_MINUTES}


async def overview(request: Request) -> Response:
    state = console_state(request)
    snapshot = await read_snapshot(state.db)
    return render(request, "overview.html", **_context(state, snapshot))


async def stream(request: Request) -> Response:
    """The overview's figures as an HTML fragment every refresh (``event: overview``)."""
    state = console_state(request)
    template = state.templates.get_template("_overview.html")
    stop = state.stop

    async def events() -> AsyncIterator[str]:
        ends = time.monotonic() + STREAM_SECONDS
        while time.monotonic() < ends and not stop.is_set():
            snapshot = await read_snapshot(state.db)
            fragment = template.render(**_context(state, snapshot))
            data = "".join(f"data: {line}\n" for line in fragment.splitlines())
            yield f"event: overview\n{data}\n"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(state.settings.console_refresh_seconds):
                    await stop.wait()
            if await request.is_disconnected():
                return

    return StreamingResponse(events(), media_type="text/event-stream")


routes = [
    Route("/", overview, methods=["GET"]),
    Route("/overview/stream", stream, methods=["GET"]),
]
