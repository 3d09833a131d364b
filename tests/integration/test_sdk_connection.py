"""The SDK's connection: one QuartermasterError for an unreachable broker, a broker without
idempotent producers (Tansu) detected, and nothing printed unless the application set up logging."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from app.devstack import free_port
from app.devstack.tansu import TansuBroker
from app.kafka import ensure_topics
from app.settings import Settings

SCRIPT = """
import asyncio, gc, logging, sys
from app.sdk import QuartermasterClient, QuartermasterError

if sys.argv[2] == "logging":
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")

async def main() -> None:
    client = QuartermasterClient(sys.argv[1], topic_prefix=sys.argv[3], request_timeout=5)
    try:
        async with client:
            print("started")
    except QuartermasterError as error:
        print(f"{type(error).__name__}: {error}")

asyncio.run(main())
gc.collect()  # an unclosed aiokafka client would warn now
"""


def run_client(
    bootstrap: str, logging: str, prefix: str = "qm."
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, bootstrap, logging, prefix],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tansu() -> Iterator[str]:
    with TansuBroker() as broker:
        yield broker.bootstrap


def test_an_unreachable_broker_is_one_quartermaster_error_and_nothing_else_is_printed() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    done = run_client(nowhere, "quiet")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"BrokerUnavailable: the Kafka broker at {nowhere} cannot be reached")
    assert done.stderr == ""  # no traceback, no "Unclosed AIOKafkaProducer", no aiokafka log


def test_a_broker_without_idempotent_producers_is_detected_and_said_in_one_line(
    tansu: str,
) -> None:
    prefix = "sdkconn."
    asyncio.run(ensure_topics(Settings(kafka_bootstrap_servers=tansu, topic_prefix=prefix)))
    quiet = run_client(tansu, "quiet", prefix)
    assert (quiet.stdout, quiet.stderr) == ("started\n", "")
    told = run_client(tansu, "logging", prefix)
    assert told.stdout == "started\n"
    (line,) = told.stderr.splitlines()
    assert line.startswith("quartermaster.sdk.client event='broker_without_idempotent_producer'")
