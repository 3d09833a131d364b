"""Every knob of Quartermaster, read from the environment (prefix ``QM_``) or a ``.env`` file."""

from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsConfigDict

from app.console_settings import ConsoleSettings
from app.database_urls import asyncpg_url
from app.handoff_settings import HandoffSettings


class SettingsError(ValueError):
    """A ``QM_*`` value that cannot be used; the message names each variable and what it takes,
    never the value (it may be a secret)."""


class Settings(HandoffSettings, ConsoleSettings):
    """Runtime configuration. Each field documents the environment variable that sets it; the
    capture handoff's and the web console's are in their own sections (``app.handoff_settings``,
    ``app.console_settings``)."""

    model_config = SettingsConfigDict(
        env_prefix="QM_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- connections -------------------------------------------------------------------
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/quartermaster",
        validation_alias=AliasChoices("QM_DATABASE_URL", "DATABASE_URL"),
        description="URL of PostgreSQL, e.g. postgresql://user:password@host:5432/database "
        "(postgres:// and postgresql+<driver>:// are read as postgresql+asyncpg://, the driver "
        "every process uses; sslmode=… as ssl=…). DATABASE_URL also works.",
    )
    database_pool_size: int = Field(10, ge=1, description="Connections each process keeps open.")
    database_ssl: bool = Field(
        False, description="Require TLS to PostgreSQL, verifying its certificate and host name."
    )
    database_ssl_cafile: str | None = Field(
        None,
        description="CA bundle that signed PostgreSQL's certificate (default: the system's CAs).",
    )
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("QM_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated Kafka bootstrap servers. KAFKA_BOOTSTRAP_SERVERS also works.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle for Kafka TLS.")
    kafka_idempotence: bool = Field(
        True, description="Idempotent producer (acks=all). Turn off for brokers without it (Tansu)."
    )
    topic_prefix: str = Field(
        "qm.", description="Prefix of every topic Quartermaster reads or writes."
    )
    topic_partitions: int = Field(
        6, description="Partitions of the topics `qm topics create` makes."
    )
    # --- reply routing: each client of the shared replies topic reads one partition ----
    reply_topic_partitions: int = Field(
        32,
        description="Partitions of the replies topic `qm topics create` makes. Each SDK client "
        "of the shared replies topic reads one of them, so with more partitions than "
        "collectors each fetches little besides its own replies.",
        ge=1,
    )

    # --- outbox ------------------------------------------------------------------------
    outbox_shards: int = Field(16, description="Shards of the outbox table (hash of key mod S).")
    outbox_batch_size: int = Field(500, description="Rows the relay publishes per shard per round.")
    outbox_poll_seconds: float = Field(
        1.0, description="Relay fallback poll when no NOTIFY arrives."
    )
    outbox_pipeline_depth: int = Field(
        3,
        ge=1,
        description="Relay rounds in flight: the next is read and sent while earlier "
        "ones await their acks (1: one round at a time).",
    )

    # --- claim worker ------------------------------------------------------------------
    consumer_group: str = Field(
        "qm-claim-workers", description="Consumer group of the claim workers."
    )
    worker_consumers: int = Field(
        6,
        description="Kafka consumers of the group in one claim worker process. Each takes its own "
        "partitions of the requests topic and hands their records over in order; more than the "
        "topic's partitions leaves the extra ones idle.",
    )
    worker_batch_max: int = Field(
        32,
        description="Most requests one claim worker transaction carries. Requests that arrive "
        "while the worker's transactions run wait and go together into the next one (group "
        "commit); 1 gives every request a transaction of its own.",
    )
    worker_transactions: int = Field(
        2, description="Request transactions one claim worker process runs at once."
    )
    # pipelined consumption: records handed over without waiting for their outcome
    worker_max_in_flight: int = Field(
        128,
        ge=1,
        description="Most request records one claim worker process holds between reading them and "
        "their final outcome. Consumers read on while earlier records wait for or run in a "
        "transaction; at this many they wait (backpressure). Offsets are committed only up to "
        "the first record whose outcome is not final.",
    )
    consumer_session_timeout_ms: int = Field(
        6_000,
        description="Kafka group session timeout: how soon a dead worker's partitions move (and "
        "so how long its requests stall). 6 s is the broker's default minimum "
        "(group.min.session.timeout.ms); the shortest lease is three times this.",
    )
    max_request_bytes: int = Field(
        256 * 1024, description="Requests larger than this are dead-lettered."
    )
    transient_retry_max_seconds: float = Field(
        5.0, description="Cap of the backoff for transient errors."
    )
    unexpected_error_attempts: int = Field(
        3, description="Tries of an unexpected error before a dead letter."
    )

    # --- leases and reapers ------------------------------------------------------------
    default_lease_seconds: int = Field(
        300, description="Lease when a request and its site name none."
    )
    max_lease_seconds: int = Field(
        24 * 3600, description="Longest lease or wait a request may ask for."
    )
    max_attempts: int = Field(
        3, description="Grants of one job before it fails as attempts_exhausted."
    )
    reaper_interval_seconds: float = Field(5.0, description="Pause between reaper sweeps.")
    reaper_page_size: int = Field(200, description="Rows one sweep handles per page.")

    # --- sessions ----------------------------------------------------------------------
    session_max_cookies: int = Field(
        500, description="Most cookies one account's session keeps; a larger upload is refused."
    )
    session_max_bytes: int = Field(
        256 * 1024,
        description="Largest session (compact JSON) one account keeps; a larger upload is refused.",
    )

    # --- seeds -------------------------------------------------------------------------
    seed_failures_to_disable: int = Field(
        5, description="Failures in a row after which a seed turns DISABLED (reason kept)."
    )
    seed_backoff_seconds: int = Field(
        300, description="A failed seed is due again after this, doubled per failure in a row."
    )
    seed_backoff_max_seconds: int = Field(24 * 3600, description="Cap of a failed seed's backoff.")

    # --- secrets -----------------------------------------------------------------------
    secret_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated Fernet keys for secrets at rest; the first encrypts, all decrypt.",
    )
    sealing_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated X25519 private keys (base64 of 32 bytes; `qm keys new` makes "
        "one). Collectors seal the session states they send to the first one's public key, "
        "announced in every job.granted; all of them open, so keys rotate without downtime.",
    )

    # --- dead letters: nothing lost, nothing stalls -------------------------------------
    unexpected_retry_max_seconds: float = Field(
        2.0, description="Cap of the backoff between tries of a request that failed unexpectedly."
    )
    dlt_inline_max_bytes: int = Field(
        512 * 1024,
        description="A dead letter whose record would be larger travels without its value, which "
        "is kept in PostgreSQL (table dlt_values) under the id in its qm.dlt.value_ref header.",
    )
    outbox_max_attempts: int = Field(
        5,
        description="Failed tries after which the relay dead-letters a row the broker keeps "
        "refusing (unknown topic, too large) to the outbox.dlt topic, so it never blocks its shard.",
    )

    # --- security: reply topics, lease bounds, inbox retention ----------------------------
    reply_topic_pattern: str | None = Field(
        None,
        description="Regular expression a request's reply_to header must match in full. "
        "Default: the prefix's replies topic and replies.<anything>.",
    )
    min_lease_seconds: int | None = Field(
        None,
        description="Shortest lease granted; shorter requests are raised to it. Default: three "
        "times the consumer session timeout, so a claim worker's death (which stalls requests "
        "for up to one session timeout) cannot cost a heartbeating holder its lease.",
    )
    inbox_retention_seconds: int = Field(
        7 * 24 * 3600, description="How long the inbox remembers a request_id and its reply."
    )
    inbox_prune_batch: int = Field(1000, description="Inbox rows one pruning statement deletes.")

    # --- job retention ----------------------------------------------------------------------
    job_retention_seconds: int = Field(
        30 * 24 * 3600,
        description="How long a finished job and its grants are kept before the reaper deletes them.",
    )
    job_prune_batch: int = Field(1000, description="Finished jobs one pruning statement deletes.")

    # --- chaos testing (never set in production) ----------------------------------------
    fault_point: str | None = Field(
        None,
        description="Testing only: 'mid_transaction' or 'after_commit' makes the claim worker SIGKILL "
        "itself there while processing a request of QM_FAULT_JOB_ID; 'handoff_after_claim' or "
        "'handoff_after_effect' makes the handoff worker do so while handing off a capture of "
        "that job.",
    )
    fault_job_id: str | None = Field(
        None, description="Testing only: the job whose request trips the fault."
    )

    # --- operations --------------------------------------------------------------------
    log_format: Literal["console", "json"] = Field(
        "console", description="'json' in production, 'console' in development."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Minimum log level: DEBUG, INFO, WARNING, ERROR or CRITICAL."
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the Prometheus and health endpoint (0: off)."
    )
    metrics_host: str = Field(
        "0.0.0.0",
        description="Address the Prometheus and health endpoint listens on: every interface by "
        "default, for the scraper and the orchestrator's probes; `qm dev` uses 127.0.0.1.",
    )

    # --- alerts (`qm run alerts`) ------------------------------------------------------
    slack_webhook_url: SecretStr | None = Field(
        None,
        description="Slack incoming webhook the alerts process posts to (unset: alerts are only "
        "logged).",
    )
    alert_consumer_group: str = Field(
        "qm-alerts", description="Consumer group of the alerts process on the events topics."
    )
    alert_wait_seconds: float = Field(
        300.0, description="Alert when a site's oldest waiting job has waited longer than this."
    )
    alert_outbox_lag_seconds: float = Field(
        60.0, description="Alert when the oldest unpublished outbox row is older than this."
    )
    alert_repeat_seconds: float = Field(
        900.0,
        description="One message per cause in this time: a cause that keeps firing is repeated "
        "at most this often (with how often it fired meanwhile); dead letters count as recovered "
        "after this long without a new one.",
    )
    alert_check_seconds: float = Field(
        15.0, description="How often the alerts process checks waiters, outbox lag and recoveries."
    )

    # --- auditor (`qm run auditor`, docs/audit.md) -----------------------------------------
    audit_reorder_seconds: float = Field(
        120.0,
        description="How long the auditor holds events to order them by the database's clock "
        "before it checks them (how late a relay may publish without a false alarm: longer than "
        "QM_ALERT_OUTBOX_LAG_SECONDS, so a relay that far behind is alerted as such first).",
    )
    audit_grace_seconds: float = Field(
        300.0,
        description="How long past its expiry a lease may stay unended before it is a violation.",
    )
    audit_partitions_seconds: float = Field(
        30.0, gt=0, description="How often the auditor looks for partitions added to qm.events."
    )

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, url: str) -> str:
        return asyncpg_url(url)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level

    def reply_topics(self) -> str:
        """The pattern a ``reply_to`` must match in full."""
        if self.reply_topic_pattern:
            return self.reply_topic_pattern
        return re.escape(self.topic("replies")) + r"(\.[A-Za-z0-9._-]+)?"

    def shortest_lease(self) -> int:
        """The shortest lease a request gets (``QM_MIN_LEASE_SECONDS``, or its default rule)."""
        if self.min_lease_seconds is not None:
            return self.min_lease_seconds
        return math.ceil(3 * self.consumer_session_timeout_ms / 1000)

    def topic(self, name: str) -> str:
        """The full name of a topic, e.g. ``topic('requests') == 'qm.requests'``."""
        return f"{self.topic_prefix}{name}"


def _named(loc: str) -> tuple[FieldInfo | None, str]:
    """The field an error's location is, and the variable that set it (of its names, the one
    in the environment)."""
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = (
            [n for n in alias.choices if isinstance(n, str)]
            if isinstance(alias, AliasChoices)
            else []
        )
        names = names or [f"QM_{field.upper()}"]
        if loc == field or loc in names:
            return info, next((name for name in names if name in os.environ), names[0])
    return None, loc.upper()


def settings_error(exc: ValidationError) -> SettingsError:
    """One line naming each bad variable and what it takes (never its value: it may be a secret)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        known, name = _named(str(error["loc"][0]) if error["loc"] else "")
        said = str(error["msg"]).removeprefix("Value error, ")
        if said.startswith("takes "):  # our own validators say what it takes
            problems.append(f"{name} {said}")
            continue
        said = said[:1].lower() + said[1:]
        about = f" ({known.description.rstrip('.')})" if known and known.description else ""
        problems.append(f"{name} is not valid: {said}{about}")
    return SettingsError("; ".join(problems))


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once; a bad value raises ``SettingsError``."""
    try:
        return Settings()
    except ValidationError as exc:
        raise settings_error(exc) from None
