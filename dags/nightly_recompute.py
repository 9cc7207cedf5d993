"""nightly_recompute: every night, Spark recomputes the day that has just ended -- the batch truth.

**Which day.** The run that starts at midnight (of the dataset's time zone, UTC by default) checks the day
that has just ended: its data interval is
that day, its logical date is that day's midnight, and it is named `scheduled__YYYY-MM-DD` after that day.
Trigger it with the `date` Param (a date picker; only real days are accepted) to recompute any other day:
the run is named `manual__YYYY-MM-DD__<trigger time>`; without a date a manual run takes the day before it
was triggered. Each run's note says which day it recomputes. A backfill over a date range
(`airflow backfill create --dag-id nightly_recompute --from-date A --to-date B --max-active-runs 1`, or the
Backfill tab of the trigger dialog) recomputes each day from A to B, in order with one active run; a backfill
run's logical date is the day it recomputes (Airflow names it after the day's end).

    wait_for_lake_day  ->  spark_recompute  ==(Asset batchmark://truth/results)==>  validate_accuracy

1. wait_for_lake_day: waits (rescheduling, no worker slot held) until every stream partition's watermark has
   passed the end of the day plus the allowed lateness: the Faust worker has landed all of the day in the lake
   and closed its windows. After 6 hours it fails without retries and says which partitions are behind.
2. spark_recompute: the Spark provider's SparkSubmitOperator submits batch/recompute.py through the Airflow
   connection `batchmark_spark` (its host is the master: `local[*]`, `spark://host:7077`, ...; created from
   SPARK_MASTER, edit it under Admin -> Connections to run elsewhere); exact metrics from the lake replace
   that day's rows of truth.results and quality.window_accuracy in one transaction (rerunning it is safe). It
   publishes the Asset `batchmark://truth/results` with the day in the event's extra, which starts
   `validate_accuracy`.

Several runs may be active at once (a scheduled run waiting for its day never blocks a manual run for
another day); only one Spark job runs at a time. A configuration error (a bad date, a definitions file that
does not load) fails at once; an unreachable service is retried with exponential backoff. Every failure is
recorded in quality.task_failures.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG, PokeReturnValue, task

from batchmark import orchestration
from batchmark.airflow_plugin import NightlyTimetable
from batchmark.airflow_spark import RecomputeOperator

TRUTH = orchestration.truth_asset()

with DAG(
    dag_id="nightly_recompute",
    description="Spark recompute of the day that has ended: the batch truth the stream is judged against",
    schedule=NightlyTimetable(orchestration.NIGHTLY_CRON, timezone=orchestration.dataset_timezone()),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=4,
    tags=["batchmark", "batch"],
    params={"date": orchestration.date_param("Day to recompute. Empty: the day that ended before this run.")},
    default_args=orchestration.default_args("nightly_recompute"),
    doc_md=__doc__,
) as dag:

    @task.sensor(poke_interval=60, timeout=6 * 3600, mode="reschedule")
    def wait_for_lake_day() -> PokeReturnValue:
        """Done when every partition's stream watermark is past the day's end plus the allowed lateness."""
        from batchmark import config
        from batchmark.definitions import load_definitions
        from batchmark.lake import day_completeness

        settings = config.load()
        defs = load_definitions(settings.definitions_path)
        day = orchestration.context_day()
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)
        done, why = day_completeness(
            settings.events_lake, settings.events_topic, day, settings.partitions, lateness, defs.dataset.calendar
        )
        print(f"{day}: {why}")
        return PokeReturnValue(is_done=done, xcom_value=day.isoformat())

    spark_recompute = RecomputeOperator(
        task_id="spark_recompute",
        doc_md="Exact metrics for the day from the lake, written as the day's batch truth; publishes the truth "
        "Asset. Submitted with SparkSubmitOperator through the connection `batchmark_spark`.",
        outlets=[TRUTH],
        max_active_tis_per_dag=1,
    )

    wait_for_lake_day() >> spark_recompute
