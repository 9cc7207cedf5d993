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


def test_tasks_retry_with_exponential_backoff(dagbag: DagBag) -> None:
    dag = dagbag.dags["nightly_recompute"]
    for t in dag.tasks:
        if t.task_id != "check_accuracy":  # an accuracy failure is a finding, not a transient error
            assert t.retry_exponential_backoff and t.retry_delay.total_seconds() == 30, t.task_id
        assert t.on_failure_callback, t.task_id


def test_failure_callback_records_what_failed(dagbag: DagBag, pg_url: str) -> None:
    import sys

    from batchmark import storage

    fileloc = dagbag.dags["nightly_recompute"].fileloc  # the DAG file's module, as the DagBag loaded it
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == fileloc)

    class TI:
        task_id = "spark_recompute"

    module.record_failure(
        {
            "task_instance": TI(),
            "run_id": "manual__test",
            "params": {"date": "2026-11-24"},
            "exception": RuntimeError("spark recompute for 2026-11-24 failed (exit 2)"),
        }
    )
    with storage.transaction(pg_url) as cur:
        cur.execute(
            "SELECT dag_id, task_id, run_id, day, error FROM quality.task_failures WHERE run_id = %s", ("manual__test",)
        )
        assert cur.fetchall() == [
            (
                "nightly_recompute",
                "spark_recompute",
                "manual__test",
                "2026-11-24",
                "RuntimeError('spark recompute for 2026-11-24 failed (exit 2)')",
            )
        ]
