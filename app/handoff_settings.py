"""The capture handoff's settings (``QM_HANDOFF_*``, the webhook's and Airflow's): a section of
``app.settings.Settings``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings


class HandoffSettings(BaseSettings):
    """How the handoff worker claims, hands off and retries captures, and reaches its targets."""

    # --- capture handoff ----------------------------------------------------------------
    handoff_consumer_group: str = Field(
        "qm-handoff-workers", description="Consumer group of the handoff workers."
    )
    handoff_consumers: int = Field(
        6, description="Kafka consumers of the group in one handoff worker process."
    )
    handoff_batch_max: int = Field(
        16,
        ge=1,
        description="Most captures one handoff batch claims together (one statement) and, for "
        "those whose targets answer at once, finalises together (one transaction); 1 hands each "
        "capture off alone.",
    )
    handoff_batches: int = Field(
        4, ge=1, description="Handoff batches one handoff worker process runs at once."
    )
    handoff_max_in_flight: int = Field(
        128,
        ge=1,
        description="Most capture records one handoff worker process holds between reading them "
        "and their final outcome (then its consumers wait).",
    )
    handoff_lease_seconds: float = Field(
        5.0,
        gt=0,
        description="How long a handoff claim lasts unless renewed: the worker renews it every "
        "third of this while the targets answer, so a capture whose worker died is back within "
        "this plus one reaper interval, however slow its targets.",
    )
    handoff_target_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="The longest one handoff target (webhook, Airflow) may take before the "
        "attempt counts as failed and is retried.",
    )
    handoff_max_attempts: int = Field(
        5, description="Handoff attempts of one capture before it fails and is dead-lettered."
    )
    handoff_backoff_seconds: float = Field(
        2.0, description="Wait before a capture's second attempt; doubles with each attempt."
    )
    handoff_backoff_max_seconds: float = Field(300.0, description="Cap of the handoff backoff.")
    handoff_redispatch_seconds: float = Field(
        60.0,
        description="A due capture whose record was not claimed in this time is published again.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, description="Timeout of one webhook delivery (connect, send and answer)."
    )

    # --- Airflow: the DAG-run target of the capture handoff ------------------------------
    airflow_url: str | None = Field(
        None,
        description="Base URL of Airflow's API server (Airflow 3), e.g. https://airflow.internal. A "
        "capture of a site with a dag_id triggers a run of that DAG there.",
    )
    airflow_username: str | None = Field(
        None, description="The Airflow user the handoff worker signs in as (POST /auth/token)."
    )
    airflow_password: SecretStr | None = Field(None, description="That user's password.")
    airflow_timeout_seconds: float = Field(
        10.0, description="Timeout of one call to Airflow's API (connect, send and answer)."
    )
