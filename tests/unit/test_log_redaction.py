"""Every process logs through one redaction: error texts and tracebacks lose their secrets."""

from __future__ import annotations

from app.logs import redact_errors


def test_a_traceback_and_an_error_text_are_redacted() -> None:
    event = {
        "event": "sweep_failed",
        "exception": 'Traceback …\nValueError: login failed: password="hunter2-canary"',
        "error": "cookie=sid-canary; path=/",
        "sweep": "expired_leases",
    }
    cleaned = redact_errors(None, "error", event)
    assert "hunter2-canary" not in cleaned["exception"] and "Traceback" in cleaned["exception"]
    assert "sid-canary" not in cleaned["error"]
    assert cleaned["sweep"] == "expired_leases"
