"""The ids the SDK makes: request ids, and job and capture ids when the caller names none.

They are UUIDv7 (RFC 9562): a millisecond timestamp first, so ids made one after another sort one
after another. Quartermaster keys its inbox by request id, and its jobs and captures by their ids;
a time-ordered key lands on the last pages of those indexes instead of a random page of a large
one, which after each checkpoint costs a full-page image in the write-ahead log.
"""

from __future__ import annotations

import uuid

from uuid_utils.compat import uuid7


def new_uuid() -> uuid.UUID:
    """A fresh time-ordered UUID (version 7)."""
    return uuid7()


def new_id() -> str:
    """``new_uuid`` as a string (job and capture ids)."""
    return str(uuid7())
