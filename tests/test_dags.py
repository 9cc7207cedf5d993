"""Every DAG file imports, is tagged and retries (Astronomer's template checks)."""

from __future__ import annotations

import os

import pytest
from airflow.dag_processing.dagbag import DagBag


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert "nightly_recompute" in dagbag.dags


def test_dags_are_tagged_and_retry(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        for t in dag.tasks:
            if t.task_id != "check_accuracy":
                assert t.retries >= 2, f"{dag_id}.{t.task_id} does not retry"


def test_nightly_recompute_shape(dagbag: DagBag) -> None:
    dag = dagbag.dags["nightly_recompute"]
    order = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert order == {
        "wait_for_lake_day": ["spark_recompute"],
        "spark_recompute": ["validate_with_gx"],
        "validate_with_gx": ["check_accuracy"],
        "check_accuracy": [],
    }
    assert dag.params["date"] is None
