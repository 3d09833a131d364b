"""Loads a DAG folder into a ``DagBag`` in Airflow's environment and prints what it found.

Run with the Airflow virtual environment's python: ``python dagbag.py DAG_FOLDER``. Prints one JSON
object: the DAG ids, the import errors and warnings by file, and each DAG's task ids and timetable class.
"""

from __future__ import annotations

import json
import sys

from airflow.dag_processing.dagbag import DagBag


def main(folder: str) -> None:
    bag = DagBag(dag_folder=folder)
    print(
        json.dumps(
            {
                "dag_ids": sorted(bag.dag_ids),
                "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
                "warnings": {str(k): list(v) for k, v in bag.captured_warnings.items()},
                "tasks": {dag_id: sorted(dag.task_ids) for dag_id, dag in bag.dags.items()},
                "schedules": {
                    dag_id: type(dag.timetable).__name__ for dag_id, dag in bag.dags.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
