"""Kafka (KRaft) and PostgreSQL in containers, through testcontainers: the path for Docker users.

``QM_TEST_SERVICES=containers`` makes the test harness start them, ``qm dev --containers`` runs
the dev stack on them. CI does not exercise this path (its machines have no container engine);
without an engine it fails at once with one line saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.devstack import ServiceUnavailable

KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # KRaft from 7.4 on
POSTGRES_IMAGE = "postgres:18"
ENGINE_TIMEOUT_SECONDS = 5
NO_ENGINE = (
    "containers cannot start: no container engine answers (Docker or Podman, at DOCKER_HOST or "
    "/var/run/docker.sock); start one, or run without containers"
)


def require_engine() -> None:
    """Raise ``ServiceUnavailable`` unless testcontainers is installed and an engine answers."""
    try:
        import docker
        import testcontainers  # noqa: F401 - only to say it is missing
    except ImportError as exc:
        raise ServiceUnavailable(
            "containers cannot start: the `testcontainers` package is not installed "
            "(pip install -e '.[server,dev]')"
        ) from exc
    try:
        docker.from_env(timeout=ENGINE_TIMEOUT_SECONDS).ping()
    except docker.errors.DockerException as exc:
        raise ServiceUnavailable(NO_ENGINE) from exc


@contextmanager
def _started(container: Any, what: str) -> Iterator[Any]:
    try:
        container.start()
    except Exception as exc:  # the library raises many kinds; each is one line here
        raise ServiceUnavailable(f"{what} cannot start in a container: {exc}") from exc
    try:
        yield container
    finally:
        container.stop()


@contextmanager
def kafka_container() -> Iterator[str]:
    """A single-node KRaft broker in a container; yields its bootstrap servers."""
    require_engine()
    from testcontainers.community.kafka import KafkaContainer

    with _started(KafkaContainer(KAFKA_IMAGE).with_kraft(), "Kafka") as kafka:
        yield str(kafka.get_bootstrap_server())


@contextmanager
def postgres_container() -> Iterator[str]:
    """PostgreSQL in a container; yields the URL of its database (asyncpg driver)."""
    require_engine()
    from testcontainers.community.postgres import PostgresContainer

    with _started(PostgresContainer(POSTGRES_IMAGE, driver="asyncpg"), "PostgreSQL") as pg:
        yield str(pg.get_connection_url())
