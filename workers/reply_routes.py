"""Where a request's replies go: its ``reply_to`` header's topic when ``QM_REPLY_TOPIC_PATTERN``
allows it (else the default replies topic), on the partition its ``qm.reply_partition`` header
names (else the one the job id's key picks)."""

from __future__ import annotations

import contextlib
import re

from app.dlt import header
from app.errors import InvalidMessage
from app.settings import Settings
from schemas.messages import REPLY_PARTITION, REPLY_TO, parse_reply_partition
from workers.consuming import Incoming

TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class ReplyTopicRefused(InvalidMessage):
    """A ``reply_to`` header that names a topic requests may not reply to."""


class ReplyPartitionRefused(InvalidMessage):
    """A ``qm.reply_partition`` header that names no partition."""


class ReplyRoutes:
    """The reply topics requests may name, and the default one."""

    def __init__(self, settings: Settings) -> None:
        self.default = settings.topic("replies")
        self.pattern = re.compile(settings.reply_topics())

    def allowed(self, wanted: str | None) -> bool:
        return (
            wanted is not None
            and TOPIC_NAME.match(wanted) is not None
            and self.pattern.fullmatch(wanted) is not None
        )

    def checked_topic(self, record: Incoming) -> str:
        """The record's reply topic; raises ``ReplyTopicRefused`` for one it may not name."""
        wanted = header(record.headers, REPLY_TO)
        if wanted is not None and not self.allowed(wanted):
            raise ReplyTopicRefused(
                f"reply_to {wanted[:249]!r} does not match the reply topic pattern "
                f"{self.pattern.pattern!r}"
            )
        return wanted or self.default

    def topic(self, record: Incoming) -> str:
        """Where a record's answer goes: its ``reply_to`` when allowed, else the default."""
        wanted = header(record.headers, REPLY_TO)
        return wanted if wanted and self.allowed(wanted) else self.default

    def lenient_partition(self, record: Incoming) -> int | None:
        """The partition of a bad record's answer: the one it names when it names its reply
        topic and a partition, else None (the key picks it)."""
        wanted = header(record.headers, REPLY_TO)
        if wanted is not None and not self.allowed(wanted):
            return None
        with contextlib.suppress(ReplyPartitionRefused):
            return reply_partition(record)
        return None


def reply_partition(record: Incoming) -> int | None:
    """The partition the record's ``qm.reply_partition`` header asks replies to go to."""
    wanted = header(record.headers, REPLY_PARTITION)
    if wanted is None:
        return None
    try:
        return parse_reply_partition(wanted)
    except ValueError as exc:
        raise ReplyPartitionRefused(str(exc)) from None
