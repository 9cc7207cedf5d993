"""Every DAG file imports, is documented, owned, tagged and retries (Astronomer's template checks), and the two
DAGs are wired as documented: nightly_recompute publishes the truth Asset that schedules validate_accuracy."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import ExceptionRetryPolicy

from batchmark import orchestration
from batchmark.airflow_plugin import NightlyTimetable

DAG_IDS = {"nightly_recompute", "validate_accuracy", "deliver_alerts", "replay_benchmark"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == DAG_IDS


def test_dags_are_documented_owned_tagged_and_retry(dagbag: DagBag) -> None:
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and "batchmark" in dag.tags, dag_id
        assert dag.doc_md and dag_id in dag.doc_md.splitlines()[0], dag_id
        assert dag.description, dag_id
        if dag_id in orchestration.DAY_DAGS:
            assert dag.params["date"] is None, dag_id
        for t in dag.tasks:
            assert t.owner == orchestration.OWNER, (dag_id, t.task_id)
            assert t.on_failure_callback, (dag_id, t.task_id)
            assert isinstance(t.retry_policy, ExceptionRetryPolicy), (dag_id, t.task_id)
            # an accuracy failure is a finding, not a transient error; the outbox's retry is its next run
            if t.task_id not in ("check_accuracy", "send_pending_alerts"):
                assert t.retries >= 2, f"{dag_id}.{t.task_id} does not retry"
                assert t.retry_exponential_backoff and t.retry_delay.total_seconds() == 30, t.task_id
            else:
                assert t.retries == 0


def test_nightly_recompute_shape(dagbag: DagBag) -> None:
    dag = dagbag.dags["nightly_recompute"]
    order = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert order == {"wait_for_lake_day": ["spark_recompute"], "spark_recompute": []}
    assert isinstance(dag.timetable, NightlyTimetable)
    assert dag.timetable.summary == orchestration.NIGHTLY_CRON
    # A scheduled run waiting for its day must not block a manual run for another day; one Spark at a time.
    assert dag.max_active_runs >= 2
    spark = dag.get_task("spark_recompute")
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    assert isinstance(spark, SparkSubmitOperator) and spark._conn_id == "batchmark_spark"  # where: a connection
    assert spark.application.endswith("batch/recompute.py")
    assert spark.max_active_tis_per_dag == 1
    assert [a.uri for a in spark.outlets] == [orchestration.TRUTH_ASSET_URI]
    sensor = dag.get_task("wait_for_lake_day")
    assert sensor.mode == "reschedule" and sensor.timeout == 6 * 3600


def test_validate_accuracy_runs_on_the_truth_asset(dagbag: DagBag) -> None:
    dag = dagbag.dags["validate_accuracy"]
    order = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert order == {
        "days_to_validate": ["validate_with_gx"],
        "validate_with_gx": ["alert_on_drift"],
        "alert_on_drift": ["check_accuracy"],
        "check_accuracy": [],
    }
    assert dag.timetable.asset_condition.uri == orchestration.TRUTH_ASSET_URI
    assert [a.uri for a in dag.get_task("validate_with_gx").outlets] == [orchestration.ACCURACY_ASSET_URI]
    assert dag.params["metrics"] == []
    assert dag.is_paused_upon_creation is False  # triggering nightly_recompute must be enough


def test_failure_callback_records_what_failed(pg_url: str) -> None:
    from datetime import UTC, datetime

    from batchmark import storage

    class TI:
        task_id = "spark_recompute"

    for run_id, params, interval_start, day in (
        ("manual__test", {"date": "2026-11-24"}, None, "2026-11-24"),
        ("scheduled__2026-11-20", {"date": None}, datetime(2026, 11, 20, tzinfo=UTC), "2026-11-20"),
    ):
        orchestration.record_failure(
            "nightly_recompute",
            {
                "task_instance": TI(),
                "run_id": run_id,
                "params": params,
                "data_interval_start": interval_start,
                "exception": RuntimeError(f"spark recompute for {day} failed (exit 2)"),
            },
        )
        with storage.transaction(pg_url) as cur:
            cur.execute(
                "SELECT dag_id, task_id, run_id, day, error FROM quality.task_failures WHERE run_id = %s", (run_id,)
            )
            assert cur.fetchall() == [
                (
                    "nightly_recompute",
                    "spark_recompute",
                    run_id,
                    day,
                    f"RuntimeError('spark recompute for {day} failed (exit 2)')",
                )
            ]


def test_the_spark_connection_comes_from_spark_master_and_then_belongs_to_the_user(airflow_db: Path) -> None:
    """migrate() creates `batchmark_spark` from SPARK_MASTER once; an edit (UI, CLI) is never overwritten."""
    import subprocess

    from batchmark import config
    from batchmark.airflow_env import airflow_bin, ensure_spark_connection

    env = {**os.environ}
    settings = config.load()

    def host() -> str:
        out = subprocess.run(
            [airflow_bin(), "connections", "get", "batchmark_spark", "-o", "json"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return json.loads(out)[0]["host"]

    assert host() == settings.spark_master
    subprocess.run(
        [airflow_bin(), "connections", "delete", "batchmark_spark"], env=env, check=True, capture_output=True
    )
    ensure_spark_connection(dataclasses.replace(settings, spark_master="spark://10.0.0.9:7077"), env)
    assert host() == "spark://10.0.0.9:7077"
    ensure_spark_connection(settings, env)  # an existing connection is left as the user made it
    assert host() == "spark://10.0.0.9:7077"
    subprocess.run(
        [airflow_bin(), "connections", "delete", "batchmark_spark"], env=env, check=True, capture_output=True
    )
    ensure_spark_connection(settings, env)
    assert host() == settings.spark_master


def test_deliver_alerts_retries_the_outbox_every_quarter_hour(dagbag: DagBag) -> None:
    dag = dagbag.dags["deliver_alerts"]
    assert [t.task_id for t in dag.tasks] == ["send_pending_alerts"]
    assert dag.timetable.expression == "*/15 * * * *"
    assert dag.is_paused_upon_creation is False and dag.catchup is False and dag.max_active_runs == 1


def test_replay_benchmark_is_triggered_by_hand_with_validated_params(dagbag: DagBag) -> None:
    dag = dagbag.dags["replay_benchmark"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # only when someone triggers it
    order = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert order == {"check_request": ["replay_and_compare"], "replay_and_compare": ["verdict"], "verdict": []}
    params = dag.params
    assert params["stable"] == "stable" and params["rate"] is None
    from airflow.sdk.definitions.param import ParamValidationError

    for key, bad in (("candidate", "Not A Label"), ("rate", -5), ("source", "")):
        p = params.get_param(key)
        with pytest.raises(ParamValidationError):
            p.resolve(bad)
    assert params.get_param("candidate").resolve("small-hll") == "small-hll"
    assert params.get_param("rate").resolve(2000) == 2000
