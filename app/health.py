"""The metrics and health endpoint of every process, on ``QM_METRICS_PORT`` (0: off).

- ``/metrics``: Prometheus text (prometheus-client's WSGI app).
- ``/healthz``: the process is alive: its event loop answers within ``LIVE_TIMEOUT_SECONDS``.
- ``/readyz``: every process in this OS process passes its readiness checks (database answers,
  broker answers, consumer has partitions ...), evaluated when asked; 200 or 503, with a JSON body
  naming each check. The same evaluation runs every ``CHECK_INTERVAL_SECONDS`` from the start and
  sets ``qm_ready`` and ``qm_ready_check``, so the gauge is a measured value before any failure.

A process that retries a transient failure in place (``set_ready(process, False)``) is not ready
until it reports success again, whatever its checks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = structlog.get_logger()

READY = Gauge("qm_ready", "1 while the process passes its readiness checks.", ["process"])
READY_CHECK = Gauge(
    "qm_ready_check", "1 while this readiness check of the process passes.", ["process", "check"]
)
REQUESTS = Counter(
    "qm_requests_total",
    "Requests the claim workers handled, by type and outcome.",
    ["type", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "qm_request_seconds",
    "Time from reading a request to its committed transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
REQUESTS_PER_TRANSACTION = Histogram(
    "qm_requests_per_transaction",
    "Requests a claim worker's transaction carried (group commit), and whether it committed.",
    ["committed"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
CAPTURES_PER_BATCH = Histogram(
    "qm_handoff_captures_per_batch",
    "Capture records a handoff worker's batch carried, and whether it went through.",
    ["committed"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
RECORDS_PER_FETCH = Histogram(
    "qm_consumer_records_per_fetch",
    "Records a worker's consumer took in one fetch (getmany), by consumer group.",
    ["group"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
SWEEP_CHANGES = Counter(
    "qm_reaper_changes_total", "Rows the reapers repaired, by sweep.", ["sweep"]
)
SWEEP_ROW_FAILURES = Counter(
    "qm_reaper_row_failures_total",
    "Rows (or sites) a sweep could not repair because their repair raised; skipped, by sweep.",
    ["sweep"],
)
SITE_RUNNING = Gauge("qm_site_running", "Jobs holding a slot of the site.", ["site"])
SITE_WAITING = Gauge("qm_site_waiting", "Jobs waiting for the site.", ["site"])
SITE_ACCOUNTS = Gauge(
    "qm_site_accounts",
    "Accounts of the site by status (ACTIVE counts cooling ones).",
    ["site", "status"],
)
SITE_ACCOUNT_HEALTH = Gauge(
    "qm_site_account_health",
    "Accounts of the site by health: new, healthy, at_risk, failing, blocked, retired.",
    ["site", "health"],
)

CHECK_TIMEOUT_SECONDS = 3.0  # a check that takes longer fails
CHECK_INTERVAL_SECONDS = 5.0  # how often the gauges are refreshed without a request
LIVE_TIMEOUT_SECONDS = 5.0  # an event loop that does not answer in this time is not alive

# A readiness check: returns (anything but False) or raises.
Check = Callable[[], Awaitable[object]]


@dataclass
class ProcessHealth:
    """The readiness checks of one process (worker, relay, ...)."""

    name: str
    checks: dict[str, Check] = field(default_factory=dict)
    retrying: bool = False

    def check(self, name: str, check: Check) -> None:
        """Add a readiness check (a second one of the same name replaces the first)."""
        self.checks[name] = check

    async def evaluate(self) -> dict[str, bool]:
        names = list(self.checks)
        results = await asyncio.gather(*(_passes(self.checks[name]) for name in names))
        outcome = dict(zip(names, results, strict=True))
        if self.retrying:
            outcome["no_transient_failure"] = False
        for check, ok in outcome.items():
            READY_CHECK.labels(self.name, check).set(1 if ok else 0)
        READY.labels(self.name).set(1 if all(outcome.values()) else 0)
        return outcome


async def _passes(check: Check) -> bool:
    try:
        return await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS) is not False
    except Exception:  # noqa: BLE001 - any failure of a check means "not ready"
        return False


class Health:
    """Every process of this OS process, and the endpoint that reports on them."""

    def __init__(self) -> None:
        self.processes: dict[str, ProcessHealth] = {}
        # what protects the connections (app.transport), shown by /readyz; never a readiness check
        self.transport: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: WSGIServer | None = None

    def process(self, name: str) -> ProcessHealth:
        return self.processes.setdefault(name, ProcessHealth(name))

    async def evaluate(self) -> dict[str, dict[str, bool]]:
        """Every process's checks, run now (and the gauges set from them)."""
        found = await asyncio.gather(*(p.evaluate() for p in self.processes.values()))
        return dict(zip(self.processes, found, strict=True))

    async def watch(self, stop: asyncio.Event) -> None:
        """Evaluate every ``CHECK_INTERVAL_SECONDS`` from now until ``stop`` is set."""
        while not stop.is_set():
            await self.evaluate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL_SECONDS)

    def serve(self, port: int, loop: asyncio.AbstractEventLoop, addr: str) -> int:
        """Serve /metrics, /healthz and /readyz on ``addr``:``port`` in a thread; return the bound
        port."""
        self._loop = loop
        server = _ThreadingWSGIServerV6 if ":" in addr else ThreadingWSGIServer  # "::" for IPv6
        self._server = make_server(addr, port, self.wsgi_app, server, handler_class=_QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="health", daemon=True).start()
        bound = int(self._server.server_address[1])
        log.info("health_endpoint_started", host=addr, port=bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- WSGI -----------------------------------------------------------------------------

    _metrics = staticmethod(make_wsgi_app())

    def wsgi_app(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            alive = self._on_loop(_alive(), LIVE_TIMEOUT_SECONDS) is not None
            return _answer(start_response, alive, {"alive": alive})
        if path == "/readyz":
            found = self._on_loop(self.evaluate(), CHECK_TIMEOUT_SECONDS + 2)
            ready = found is not None and all(all(c.values()) for c in found.values())
            body: dict[str, Any] = {"ready": ready, "processes": found or {}}
            if self.transport is not None:
                body["transport"] = self._on_loop(self.transport(), CHECK_TIMEOUT_SECONDS + 2)
            return _answer(start_response, ready, body)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    def _on_loop(self, work: Awaitable[Any], timeout: float) -> Any:
        """Run ``work`` on the processes' event loop; None if it does not finish in time."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(work), self._loop)
        try:
            return future.result(timeout)
        except Exception:  # noqa: BLE001 - a loop that is gone or stuck answers "no"
            future.cancel()
            return None


async def _as_coroutine(work: Awaitable[Any]) -> Any:
    return await work


async def _alive() -> bool:
    return True


def _answer(start_response: Callable[..., Any], ok: bool, body: dict[str, Any]) -> list[bytes]:
    start_response(
        "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")]
    )
    return [json.dumps(body).encode() + b"\n"]


class _ThreadingWSGIServerV6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


HEALTH = Health()  # one per OS process, as the Prometheus registry is


def consumer_assigned(consumers: Callable[[], Iterable[Any]]) -> Callable[[], Awaitable[bool]]:
    """A readiness check: one of the Kafka consumers ``consumers`` names (when asked) has
    partitions assigned."""

    async def check() -> bool:
        return any(c is not None and c.assignment() for c in consumers())

    return check


def set_ready(process: str, ready: bool) -> None:
    """A process retrying a transient failure in place is not ready until it succeeds again."""
    HEALTH.process(process).retrying = not ready
    if not ready:
        READY.labels(process).set(0)


def set_site_gauges(sites: Iterable[Any]) -> None:
    """Per-site gauges from rows with slug, running, waiting and accounts (status -> count)."""
    for site in sites:
        SITE_RUNNING.labels(site["slug"]).set(site["running"])
        SITE_WAITING.labels(site["slug"]).set(site["waiting"])
        for status, count in site["accounts"].items():
            SITE_ACCOUNTS.labels(site["slug"], status).set(count)
        for health, count in (site.get("health") or {}).items():
            SITE_ACCOUNT_HEALTH.labels(site["slug"], health).set(count)
