"""`qm run console`: the operator's web console (app/console/, docs/console.md) on its own port,
loopback by default, with the dead-letter counts of its overview kept current beside it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
import uvicorn

from app.console.app import build_app
from app.console.web import ConsoleState
from app.overview import watch_dead_letters

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()
POOL_SIZE = 4
SHUTDOWN_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the root's stop event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """The console's listening socket; a port in use is one clear error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(
            f"the console cannot listen on {host}:{port} ({exc.strerror}); "
            "set QM_CONSOLE_PORT to a free port (0: any free port)"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def run_console(wiring: Wiring) -> None:
    settings = wiring.settings
    state = ConsoleState(
        settings, wiring.database(POOL_SIZE), lambda: wiring.secrets, stop=wiring.stop
    )
    app = build_app(state)
    sock = listen(settings.console_host, settings.console_port)
    host, port = sock.getsockname()[:2]
    if not state.auth.configured:
        log.warning("console_without_sign_in", hint="set QM_CONSOLE_TOKEN or QM_CONSOLE_USERS_FILE")
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
    )
    server = _Server(config)
    counts = asyncio.create_task(
        watch_dead_letters(settings, state.dead, settings.console_refresh_seconds)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("console_listening", url=f"http://{host}:{port}/")
    try:
        stopped = asyncio.create_task(wiring.stop.wait())
        await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        server.should_exit = True
        await serving
    finally:
        counts.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counts
        sock.close()
