"""The collector SDK: acquire an account, its session and seeds from Quartermaster over Kafka.

    async with QuartermasterClient("kafka:9092") as client:
        async with client.job(site="example", wait_seconds=60) as job:
            ...

See docs/sdk.md for the guide.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from app.sdk.errors import (
    BrokerUnavailable,
    ClientClosed,
    InvalidArgument,
    JobRejected,
    LeaseLost,
    NoUploadKey,
    QuartermasterError,
    ReplyUnreadable,
    RequestConflict,
    RequestFailed,
    RequestInvalid,
    RequestTimeout,
    SecretUndecryptable,
    SessionDead,
    SessionRejected,
    UnexpectedReply,
)

if TYPE_CHECKING:
    from app.sdk.client import QuartermasterClient
    from app.sdk.job import Account, Job, Session

# The client and the job are imported when first named: Quartermaster's own processes use
# app.sdk.connection_check (the broker probe) without them, and a relay restarted after a
# crash serves sooner for it (docs/performance.md, "The CLI").
_LAZY = {
    "QuartermasterClient": "app.sdk.client",
    "Account": "app.sdk.job",
    "Job": "app.sdk.job",
    "Session": "app.sdk.job",
}

__all__ = [
    "Account",
    "BrokerUnavailable",
    "ClientClosed",
    "InvalidArgument",
    "Job",
    "JobRejected",
    "LeaseLost",
    "NoUploadKey",
    "QuartermasterClient",
    "QuartermasterError",
    "ReplyUnreadable",
    "RequestConflict",
    "RequestFailed",
    "RequestInvalid",
    "RequestTimeout",
    "SecretUndecryptable",
    "Session",
    "SessionDead",
    "SessionRejected",
    "UnexpectedReply",
]


def __getattr__(name: str) -> object:
    """``QuartermasterClient``, ``Account``, ``Job`` and ``Session``, imported when first asked."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
