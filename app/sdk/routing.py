"""Reply routing: which partition of a shared reply topic a client reads.

Collectors share ``<prefix>replies`` by default. Each client picks one partition of it, says so in
the ``qm.reply_partition`` header of every request, and reads only that partition; Quartermaster
sends every reply of the request, and every later reply of a job it started, to that partition.
So a client fetches its own replies and those of the few clients that picked the same partition,
not everyone's (docs/performance.md). The pick hashes a random id of the client, which spreads
clients over the partitions without any coordination between them.
"""

from __future__ import annotations

import hashlib


def choose_partition(client_id: str, partitions: int) -> int:
    """The partition, of ``partitions``, a client with ``client_id`` reads its replies from."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, not {partitions}")
    digest = hashlib.sha256(client_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def partition_to_read(
    topic: str, partitions: int, *, asked: int | None, route: bool, client_id: str
) -> int | None:
    """The one partition of ``topic`` (of ``partitions``) a client reads; None: all of them.

    A partition ``asked`` for must exist (ValueError if not); else the client picks one when it
    ``route``s its replies (on the shared topic), and reads the whole topic when not.
    """
    if asked is not None:
        if not 0 <= asked < partitions:
            raise ValueError(
                f"reply partition {asked} does not exist: {topic} has partitions 0 to "
                f"{partitions - 1}"
            )
        return asked
    return choose_partition(client_id, partitions) if route else None
