"""The Kafka headers of the contract: the correlation id, the reply topic and the reply partition."""

from __future__ import annotations

CORRELATION_ID = "correlation_id"
REPLY_TO = "reply_to"
# The partition of the reply topic a request's replies go to (as Spring's ReplyingKafkaTemplate
# does with its reply-partition header). Its value is the partition number in decimal ASCII
# digits, e.g. b"7": no sign, no spaces, at most MAX_REPLY_PARTITION. Without it, replies are
# keyed by job id and Kafka's partitioner picks the partition (docs/contract.md).
REPLY_PARTITION = "qm.reply_partition"
MAX_REPLY_PARTITION = 2**31 - 1  # Kafka's partition numbers are signed 32-bit


def reply_partition_value(partition: int) -> bytes:
    """The ``qm.reply_partition`` header's value for ``partition``."""
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise ValueError(f"a reply partition is an integer, not {type(partition).__name__}")
    if not 0 <= partition <= MAX_REPLY_PARTITION:
        raise ValueError(f"a reply partition is 0 to {MAX_REPLY_PARTITION}, not {partition}")
    return str(partition).encode()


def parse_reply_partition(value: str) -> int:
    """The partition a ``qm.reply_partition`` header names; ValueError when it names none."""
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_REPLY_PARTITION)):
        raise ValueError(f"qm.reply_partition {value[:20]!r} is not a non-negative integer")
    partition = int(value)
    if partition > MAX_REPLY_PARTITION:
        raise ValueError(f"qm.reply_partition {partition} exceeds {MAX_REPLY_PARTITION}")
    return partition
