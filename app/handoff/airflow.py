"""The Airflow target: triggers the site's DAG for a capture through Airflow 3's REST API.

``POST {QM_AIRFLOW_URL}/api/v2/dags/{dag_id}/dagRuns`` with the capture's fields as the run's conf and
a run id derived from the capture id, so a repeated handoff (a worker that died between the call and
its finalisation) asks for the same run again, and Airflow's 409 for an existing run id is success.

Authentication is Airflow 3's: a JWT from ``POST /auth/token`` (the simple, FAB and Keycloak auth
managers all issue them there) for the configured user, kept per process and fetched again once when
Airflow refuses it (it expired, or the API server's secret changed).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

import httpx

from app.handoff.base import Delivery, TargetError
from app.handoff.http import call_errors, capture_fields, retryable_status
from app.settings import Settings

# what Airflow accepts in a run id given through the API (its default allowed_run_id_pattern) ...
RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")
# ... and the length of its run_id column
RUN_ID_MAX = 250

# one JWT per (API server, user) in this process; dropped when Airflow refuses it
_tokens: dict[tuple[str, str], str] = {}


def dag_run_id(capture_id: str) -> str:
    """``qm-<capture_id>``, one run id per capture id and never the same for two.

    Characters Airflow refuses in run ids (``@``, ``/``) become ``~`` and their hex code; ``~`` is
    never in a capture id, so the escape is one-to-one. An id too long for Airflow becomes ``qm~``
    and its SHA-256.
    """
    escaped = RUN_ID_SAFE.sub(lambda m: f"~{ord(m.group()):02x}", capture_id)
    if len(escaped) + 3 <= RUN_ID_MAX:
        return f"qm-{escaped}"
    return "qm~" + hashlib.sha256(capture_id.encode()).hexdigest()


def conf(delivery: Delivery) -> dict[str, Any]:
    """The run's conf: the capture's fields, as in its ``capture.ready`` record."""
    return capture_fields(delivery)


def classify_status(status: int, dag_id: str) -> TargetError | None:
    """None when the run exists now (created, or there already); otherwise what went wrong."""
    if 200 <= status < 300 or status == 409:
        return None
    if status == 404:
        return TargetError(f"Airflow has no DAG {dag_id!r} (HTTP 404)", retryable=False)
    if status in (401, 403):
        # a permission an operator may be granting right now
        return TargetError(f"Airflow refused to trigger {dag_id!r} (HTTP {status})", retryable=True)
    return TargetError(f"Airflow answered HTTP {status}", retryable=retryable_status(status))


class AirflowTarget:
    """Triggers ``delivery.dag_id`` once per capture on the configured Airflow."""

    name = "airflow"

    def __init__(
        self, url: str | None, username: str, password: str, timeout_seconds: float
    ) -> None:
        self.url = (url or "").rstrip("/")
        self.username = username
        self.password = password
        self.timeout = httpx.Timeout(timeout_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> AirflowTarget:
        password = settings.airflow_password
        return cls(
            settings.airflow_url,
            settings.airflow_username or "",
            password.get_secret_value() if password is not None else "",
            settings.airflow_timeout_seconds,
        )

    async def deliver(self, delivery: Delivery) -> None:
        if not delivery.dag_id:
            raise TargetError("the site has no dag_id", retryable=False)
        if not self.url:
            raise TargetError("no Airflow to trigger: QM_AIRFLOW_URL is not set", retryable=False)
        async with (
            call_errors("Airflow"),
            httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as client,
        ):
            status = await self._trigger(client, delivery)
        error = classify_status(status, delivery.dag_id)
        if error is not None:
            raise error

    async def _trigger(self, client: httpx.AsyncClient, delivery: Delivery) -> int:
        """POST the run with the kept token; once more with a fresh one if Airflow refuses it."""
        assert delivery.dag_id is not None
        path = f"/api/v2/dags/{quote(delivery.dag_id, safe='')}/dagRuns"
        body = {
            "dag_run_id": dag_run_id(delivery.capture_id),
            "logical_date": None,
            "conf": conf(delivery),
        }
        for fresh in (False, True):
            headers = {"Authorization": f"Bearer {await self._token(client, fresh=fresh)}"}
            response = await client.post(path, json=body, headers=headers)
            if response.status_code not in (401, 403):
                break
        return response.status_code

    async def _token(self, client: httpx.AsyncClient, *, fresh: bool) -> str:
        """The kept JWT, or a new one from Airflow's ``/auth/token``."""
        key = (self.url, self.username)
        if fresh or key not in _tokens:
            login = {"username": self.username, "password": self.password}
            response = await client.post("/auth/token", json=login)
            if response.status_code in (400, 401, 403):
                raise TargetError(
                    f"Airflow refused the login of {self.username!r} (HTTP {response.status_code})",
                    retryable=True,  # a password an operator may be fixing right now
                )
            if response.status_code not in (200, 201):
                raise TargetError(
                    f"Airflow's token endpoint answered HTTP {response.status_code}",
                    retryable=response.status_code >= 500,
                )
            _tokens[key] = str(response.json()["access_token"])
        return _tokens[key]
