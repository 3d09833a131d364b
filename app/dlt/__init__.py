"""Dead letters: how they are built (``headers``), read (``reader``) and replayed (``replay``).

The names every caller needs to build or show a dead letter are importable from here; the reader
and the replay, which open Kafka and PostgreSQL connections, are imported from their modules.
"""

from app.dlt.headers import (
    PREFIX,
    REPLAYED_FROM,
    OffsetRange,
    Origin,
    dead_letter_headers,
    dlt_topic,
    header,
)
from app.redaction import MAX_ERROR_MESSAGE, REDACTED, redact, redact_bytes, redact_header

__all__ = [
    "MAX_ERROR_MESSAGE",
    "PREFIX",
    "REDACTED",
    "REPLAYED_FROM",
    "OffsetRange",
    "Origin",
    "dead_letter_headers",
    "dlt_topic",
    "header",
    "redact",
    "redact_bytes",
    "redact_header",
]
