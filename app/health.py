"""The metrics and health endpoint: Prometheus text on /metrics, readiness as a gauge.

``QM_METRICS_PORT`` turns it on. Readiness (``qm_ready``) turns 0 while a process is retrying a
transient failure (database or broker unreachable) and back to 1 when it recovers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

READY = Gauge("qm_ready", "1 while the process can reach its database and broker.", ["process"])
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
SWEEP_CHANGES = Counter(
    "qm_reaper_changes_total", "Rows the reapers repaired, by sweep.", ["sweep"]
)

_started = False


def serve_metrics(port: int) -> None:
    """Serve /metrics on ``port`` (once per process; 0 means off)."""
    global _started
    if port and not _started:
        start_http_server(port, addr="0.0.0.0")
        _started = True


def set_ready(process: str, ready: bool) -> None:
    READY.labels(process).set(1 if ready else 0)
