"""A single-node Apache Kafka broker (KRaft, broker+controller) from Maven Central jars, run with java.

The jars are fetched once with ``mvn dependency:copy-dependencies`` into ``infra/kafka/.cache/libs``
(``QM_KAFKA_CACHE`` moves it) and reused; each broker gets a fresh temporary log directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from base64 import urlsafe_b64encode
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiokafka.admin import AIOKafkaAdminClient

from app.devstack import ServiceUnavailable, free_port
from app.devstack.secured_kafka import ADMIN, BrokerSecurity, apply_acls

INFRA = Path(__file__).resolve().parents[2] / "infra" / "kafka"

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
controller.listener.names=CONTROLLER
{listeners}
log.dirs={log_dir}
num.partitions=1
auto.create.topics.enable={auto_create_topics}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
message.max.bytes=4194304
"""
PLAINTEXT_LISTENERS = """\
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT"""


def cache_dir() -> Path:
    """Where the broker's jars live."""
    return Path(os.environ.get("QM_KAFKA_CACHE", INFRA / ".cache")) / "libs"


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 random bytes, URL-safe base64 without padding, never
    starting with "-" (the storage tool would read it as an option, as Kafka's own ids avoid)."""
    while (cluster_id := urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))[0] == "-":
        pass
    return cluster_id


def _require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ServiceUnavailable(f"Kafka cannot start: `{tool}` is not installed ({why}).")
    return path


def ensure_jars() -> Path:
    """Fetch the Kafka broker jars with Maven unless the cache already has them."""
    libs = cache_dir()
    if any(libs.glob("kafka_2.13-*.jar")) and any(libs.glob("kafka-tools-[0-9]*.jar")):
        return libs
    mvn = _require("mvn", "Maven fetches the Apache Kafka jars from Maven Central")
    _require("java", "the broker runs on Java 17")
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(INFRA / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise ServiceUnavailable(
            f"Kafka cannot start: fetching its jars with Maven failed:\n{tail}"
        )
    return libs


async def wait_for_metadata(
    bootstrap: str, timeout: float = 60.0, options: dict[str, Any] | None = None
) -> None:
    """Return once the broker answers a metadata request, or raise ServiceUnavailable."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # refused connects are expected here
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=3000, **(options or {})
        )
        try:
            await admin.start()
            await admin.list_topics()
            logging.getLogger("aiokafka").setLevel(logging.NOTSET)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not up yet"
            last = exc
            await asyncio.sleep(0.25)
        finally:
            await admin.close()
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    raise ServiceUnavailable(
        f"Kafka at {bootstrap} did not answer metadata in {timeout:.0f}s: {last}"
    )


class KafkaBroker:
    """A running single-node KRaft broker on free loopback ports; ``with`` stops it."""

    def __init__(
        self,
        *,
        heap: str = "768m",
        auto_create_topics: bool = True,
        security: BrokerSecurity | None = None,
    ) -> None:
        """``auto_create_topics=False`` makes it refuse unknown topics, as production brokers
        usually do (a deleted topic then stays deleted). ``security``: one SASL_SSL listener
        with ACLs instead of the PLAINTEXT one (``app.devstack.secured_kafka``)."""
        self.heap = heap
        self.auto_create_topics = auto_create_topics
        self.security = security
        self.port = 0
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        """Format fresh KRaft storage, start the broker and wait until it answers metadata."""
        java = _require("java", "the broker runs on Java 17")
        classpath = f"{ensure_jars()}/*"
        self.workdir = Path(tempfile.mkdtemp(prefix="qm-kafka-"))
        self.port = free_port()
        controller_port = free_port()
        config = self.workdir / "server.properties"
        config.touch(mode=0o600)  # a secured broker's file holds the admin's password
        listeners = (
            self.security.listeners(self.port, controller_port)
            if self.security
            else PLAINTEXT_LISTENERS.format(port=self.port, controller_port=controller_port)
        )
        config.write_text(
            SERVER_PROPERTIES.format(
                controller_port=controller_port,
                listeners=listeners,
                log_dir=self.workdir / "data",
                auto_create_topics=str(self.auto_create_topics).lower(),
            )
        )
        cluster_id = new_cluster_id()
        users = self.security.format_arguments() if self.security else []
        fmt = subprocess.run(
            [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id,
             "-c", str(config), *users],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if fmt.returncode != 0:
            raise ServiceUnavailable(f"Kafka storage format failed:\n{fmt.stderr[-2000:]}")
        self._log = open(self.workdir / "broker.log", "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [java, f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseSerialGC", "-cp", classpath,
             "kafka.Kafka", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            asyncio.run(wait_for_metadata(self.bootstrap, timeout, self.admin_options()))
        except ServiceUnavailable:
            output = (self.workdir / "broker.log").read_text(errors="replace")[-3000:]
            self.stop()
            raise ServiceUnavailable(f"Kafka did not come up; its output:\n{output}") from None
        return self

    def kill(self) -> None:
        """Stop the broker at once (SIGKILL), keeping its data for a restart."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout: float = 90.0) -> None:
        """Start the broker again on the same ports and data (after ``kill`` or ``terminate``)."""
        assert self.workdir is not None
        java = _require("java", "the broker runs on Java 17")
        self._close_log()
        self._log = open(self.workdir / "broker.log", "ab")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [java, f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseSerialGC", "-cp",
             f"{cache_dir()}/*", "kafka.Kafka", str(self.workdir / "server.properties")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        asyncio.run(wait_for_metadata(self.bootstrap, timeout, self.admin_options()))

    def admin_options(self) -> dict[str, Any]:
        """aiokafka options of a super user (none for the PLAINTEXT broker)."""
        return self.security.aiokafka_options(ADMIN) if self.security else {}

    def add_acls(self, commands: list[list[str]]) -> None:
        """Apply ACLs to the secured broker: each command is kafka-acls' ``--add ...`` arguments."""
        assert self.security is not None and self.workdir is not None, "a secured, started broker"
        apply_acls(f"{cache_dir()}/*", self.bootstrap, self.security, self.workdir, commands)

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after 20 s) and remove its data."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_log()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    """Start a broker in the foreground (``python -m app.devstack.kafka``) until Ctrl-C."""
    with KafkaBroker() as broker:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        try:
            assert broker.process is not None
            broker.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
