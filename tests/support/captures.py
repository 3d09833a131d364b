"""Helpers for capture tests: a running job to submit from, submissions as records, outbox
counts, and a real webhook receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.root import Wiring
from app.settings import Settings
from app.store import captures
from app.urls import webhook_shown
from reapers.runner import run_reapers
from tests.support.leasing import lease_fields, make_site, replies, request, scalar, start
from workers.requests import Incoming, RequestProcessor


async def running_job(
    processor: RequestProcessor,
    engine: AsyncEngine,
    settings: Settings,
    job_id: str = "job-1",
    *,
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """A site (with ``webhook_url``) and a granted job on it; what its follow-ups present
    (``lease_fields``: its token and secret)."""
    if await scalar(engine, "SELECT count(*) FROM sites WHERE slug = 'board'") == 0:
        await make_site(engine, settings, capacity=10, n_accounts=10)
    if webhook_url is not None:
        async with engine.begin() as conn:
            sealed = SecretBox.from_settings(settings).seal(webhook_url)
            await captures.set_site_webhook(conn, "board", webhook_shown(webhook_url), sealed)
    assert await processor.process(start(settings, job_id)) == "replied"
    [grant] = [r for r in await replies(engine, settings, job_id) if r["type"] == "job.granted"]
    return lease_fields(grant)


def capture_body(capture_id: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "capture_id": capture_id,
        "url": f"https://board.example.com/items/{capture_id}",
        "storage_uri": f"s3://captures/{capture_id}.html",
        "sha256": hashlib.sha256(capture_id.encode()).hexdigest(),
        "content_type": "text/html",
        "size": 1234,
        "captured_at": "2026-01-01T00:00:00Z",
        "meta": {"page": 1},
    }
    return {**body, **overrides}


def submit(
    settings: Settings, job_id: str, lease: dict[str, Any], capture_id: str, **overrides: Any
) -> Incoming:
    """A capture.submit record as the claim worker reads it (``lease``: ``lease_fields``)."""
    return request(
        settings,
        "capture.submit",
        job_id,
        **lease,
        **capture_body(capture_id, **overrides),
    )


async def outbox_payloads(engine: AsyncEngine, topic: str) -> list[dict[str, Any]]:
    """The JSON payloads written to ``topic`` through the outbox, in order."""
    async with engine.connect() as conn:
        from sqlalchemy import text

        rows = await conn.execute(
            text("SELECT payload FROM outbox WHERE topic = :topic ORDER BY id"), {"topic": topic}
        )
        return [json.loads(bytes(payload)) for (payload,) in rows]


async def relayed(engine: AsyncEngine, topic: str) -> None:
    """What the relay does once it published ``topic``'s rows: they leave the outbox."""
    from sqlalchemy import text

    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox WHERE topic = :topic"), {"topic": topic})


async def capture_row(engine: AsyncEngine, capture_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = await captures.describe_capture(conn, capture_id)
    assert row is not None
    return dict(row)


@dataclass
class Hit:
    """One request the webhook receiver got."""

    idempotency_key: str | None
    body: dict[str, Any]
    at: float


@dataclass
class Webhook:
    """A real HTTP server on loopback that answers with scripted statuses (the last repeats);
    status 0 means: never answer (until the server stops). ``delay``: seconds before each answer
    (a slow target)."""

    statuses: list[int]
    delay: float = 0.0
    hits: list[Hit] = field(default_factory=list)
    url: str = ""
    released: threading.Event = field(default_factory=threading.Event)

    def next_status(self) -> int:
        index = min(len(self.hits) - 1, len(self.statuses) - 1)
        return self.statuses[index]


@contextmanager
def webhook(*statuses: int, delay: float = 0.0) -> Iterator[Webhook]:
    """A webhook receiver answering ``statuses`` in turn, at ``.url``, each ``delay`` late."""
    hook = Webhook(list(statuses) or [200], delay=delay)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            hook.hits.append(Hit(self.headers.get("Idempotency-Key"), body, time.time()))
            status = hook.next_status()
            if status == 0:
                hook.released.wait(60)
                return
            if hook.delay:
                hook.released.wait(hook.delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/captures"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.released.set()
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def running_reaper(settings: Settings) -> AsyncIterator[None]:
    """The reaper process's sweeps running in this event loop until the block ends."""
    wiring = Wiring(settings, asyncio.Event(), "reaper")
    task = asyncio.create_task(run_reapers(wiring))
    try:
        yield
    finally:
        wiring.stop.set()
        await asyncio.wait_for(task, 30)
        await wiring.close()
