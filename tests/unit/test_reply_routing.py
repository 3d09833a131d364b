"""Reply routing's pure parts: the header's encoding and parsing, and a client's partition."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app.sdk import QuartermasterClient
from app.sdk.routing import choose_partition, partition_to_read
from schemas.messages import (
    MAX_REPLY_PARTITION,
    REPLY_PARTITION,
    JobHeartbeat,
    parse_reply_partition,
    reply_partition_value,
)


@pytest.mark.parametrize("partition", [0, 7, 31, MAX_REPLY_PARTITION])
def test_a_reply_partition_survives_its_header(partition: int) -> None:
    assert parse_reply_partition(reply_partition_value(partition).decode()) == partition


def test_the_header_is_the_partition_in_decimal_digits() -> None:
    assert REPLY_PARTITION == "qm.reply_partition"
    assert reply_partition_value(12) == b"12"
    assert parse_reply_partition("007") == 7


@pytest.mark.parametrize(
    "value", ["", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x1f", "abc", "٣", "2147483648", "9" * 40]
)
def test_a_header_that_names_no_partition_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"qm\.reply_partition"):
        parse_reply_partition(value)


@pytest.mark.parametrize("partition", [-1, MAX_REPLY_PARTITION + 1])
def test_no_header_is_made_for_a_partition_kafka_cannot_have(partition: int) -> None:
    with pytest.raises(ValueError, match="a reply partition is 0 to"):
        reply_partition_value(partition)


def test_a_client_id_always_picks_the_same_partition_within_the_topic() -> None:
    picks = [choose_partition(f"client-{n}", 32) for n in range(1000)]
    assert picks == [choose_partition(f"client-{n}", 32) for n in range(1000)]
    assert set(picks) == set(range(32))  # spread over every partition
    assert max(picks.count(p) for p in range(32)) < 3 * 1000 / 32  # and not piled on a few
    assert choose_partition("anyone", 1) == 0


def test_a_topic_without_partitions_has_none_to_pick() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        choose_partition("client", 0)


def test_the_partition_a_client_reads() -> None:
    pick = choose_partition("c", 8)
    assert partition_to_read("t", 8, asked=None, route=True, client_id="c") == pick
    assert partition_to_read("t", 8, asked=None, route=False, client_id="c") is None
    assert partition_to_read("t", 8, asked=3, route=False, client_id="c") == 3
    assert partition_to_read("t", 8, asked=7, route=True, client_id="c") == 7
    with pytest.raises(
        ValueError, match="reply partition 8 does not exist: t has partitions 0 to 7"
    ):
        partition_to_read("t", 8, asked=8, route=True, client_id="c")


def test_a_client_cannot_be_made_with_a_negative_reply_partition() -> None:
    with pytest.raises(ValueError, match="a reply partition is 0 to"):
        QuartermasterClient("127.0.0.1:1", reply_partition=-1)


class Recorder:
    """Stands in for the client's producer: keeps the headers of what is sent."""

    def __init__(self) -> None:
        self.headers: list[dict[str, bytes]] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: Any) -> None:
        self.headers.append(dict(headers))


def heartbeat() -> JobHeartbeat:
    return JobHeartbeat(
        request_id=uuid.uuid4(), job_id="job-1", lease_token=1, lease_secret="S" * 43
    )


async def sent_headers(client: QuartermasterClient) -> dict[str, bytes]:
    recorder = Recorder()
    client._producer = recorder  # type: ignore[assignment]
    await client.send(heartbeat())
    return recorder.headers[0]


async def test_a_client_with_a_reply_partition_names_it_in_every_request() -> None:
    client = QuartermasterClient("127.0.0.1:1", reply_partition=9)
    assert (await sent_headers(client))[REPLY_PARTITION] == b"9"


async def test_a_client_reading_its_whole_reply_topic_sends_no_reply_partition() -> None:
    client = QuartermasterClient("127.0.0.1:1", reply_topic="replies.mine")
    assert REPLY_PARTITION not in await sent_headers(client)
