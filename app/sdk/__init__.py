"""The collector SDK: acquire an account, its session and seeds from Quartermaster over Kafka.

    async with QuartermasterClient("kafka:9092") as client:
        async with client.job(site="example", wait_seconds=60) as job:
            ...

See docs/sdk.md for the guide.
"""

from app.sdk.client import QuartermasterClient
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
from app.sdk.job import Account, Job, Session

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
