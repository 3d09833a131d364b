"""Which failed sends of the relay are the broker's refusal (a try spent) and which are no answer."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from app.outbox.refusals import definite


@pytest.mark.parametrize(
    "error",
    [MessageSizeTooLargeError(), TopicAuthorizationFailedError("t"), KafkaError("refused")],
)
def test_a_refusal_spends_a_try(error: KafkaError) -> None:
    assert definite(error)


@pytest.mark.parametrize(
    "error",
    [
        KafkaTimeoutError(),  # aiokafka does not mark its own time-out retriable
        RequestTimedOutError(),
        KafkaConnectionError(),
        LeaderNotAvailableError(),
        NotLeaderForPartitionError(),
        UnknownTopicOrPartitionError(),  # on a send: metadata being refreshed, retried
    ],
)
def test_no_answer_spends_nothing(error: KafkaError) -> None:
    assert not definite(error)
