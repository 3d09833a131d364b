"""One run per capture, triggered by Quartermaster's handoff worker through Airflow's REST API.

A site whose ``dag_id`` is ``qm_capture_handoff`` (``qm sites set SITE --dag-id qm_capture_handoff``)
has each of its captures handed off as a run of this DAG: the run id is ``qm-<capture_id>`` (so a
repeated handoff never makes a second run) and the run's conf holds the capture's fields.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, task

with DAG(dag_id="qm_capture_handoff", schedule=None, tags=["quartermaster"]):

    @task
    def process(dag_run: Any = None) -> str:
        """The capture's fields are the run's conf."""
        capture = dag_run.conf
        print(f"capture {capture['capture_id']} of {capture['url']} at {capture['storage_uri']}")
        return str(capture["capture_id"])

    process()
