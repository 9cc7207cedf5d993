"""nightly_recompute: every night, the batch recompute is the benchmark of the stream.

For one day (the ``date`` param, or else the day of the run's data interval):

    wait_for_lake_day  ->  spark_recompute  ->  validate_with_gx  ->  check_accuracy

1. wait_for_lake_day: waits until every stream partition's watermark has passed the end of the day plus the
   allowed lateness, i.e. the Faust worker has landed all of the day in the lake and closed its windows.
2. spark_recompute: spark-submit batch/recompute.py; exact metrics from the lake replace that day's rows of
   truth.results in one transaction (rerunning it is safe).
3. validate_with_gx: the Great Expectations checkpoint compares stream.results with truth.results
   (completeness: every truth window has a stream row; accuracy: relative error within each metric's
   tolerance), updates the Data Docs and appends to quality.accuracy_history.
4. check_accuracy: fails the run when any metric is out of tolerance, so the failure callback raises the alert.

Every task is idempotent and retried with exponential backoff; failures are recorded in quality.task_failures.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, PokeReturnValue, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"


def _day() -> date:
    """The day this run benchmarks: the `date` param if given, else the start of the data interval."""
    from batchmark.windows import parse_day, yesterday

    ctx = get_current_context()
    given = (ctx["params"] or {}).get("date")
    if given:
        return parse_day(given)
    start = ctx.get("data_interval_start")
    return start.date() if start else yesterday()


def _run_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.:+-]", "_", str(get_current_context()["run_id"]))[:200]


def record_failure(context: dict[str, Any]) -> None:
    """Failure callback: record which task failed, for which day, and why."""
    from batchmark import config, storage

    ti = context.get("task_instance") or context.get("ti")
    params = context.get("params") or {}
    storage.record_task_failure(
        config.load().database_url,
        dag_id="nightly_recompute",
        task_id=getattr(ti, "task_id", "?"),
        run_id=str(context.get("run_id")),
        day=params.get("date"),
        error=repr(context.get("exception"))[:2000],
    )


with DAG(
    dag_id="nightly_recompute",
    description="Spark recompute of a day's metrics, then GX validation of the stream against it",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["batchmark", "batch", "validation"],
    params={
        "date": Param(
            None,
            type=["null", "string"],
            pattern=DATE_PATTERN,
            maxLength=10,  # the pattern's $ would let a trailing newline through
            description="Day to recompute and validate, YYYY-MM-DD. Empty: the day of the data interval.",
        ),
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "on_failure_callback": record_failure,
    },
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
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)
        done, why = day_completeness(settings.events_lake, settings.events_topic, _day(), settings.partitions, lateness)
        print(why)
        return PokeReturnValue(is_done=done)

    @task
    def spark_recompute() -> dict[str, Any]:
        """Exact metrics for the day from the lake, written as the day's batch truth."""
        from batchmark import config, spark

        return spark.submit(config.load(), _day(), _run_id())

    @task
    def validate_with_gx(recompute: dict[str, Any]) -> dict[str, Any]:
        """Run the GX checkpoint; returns pass/fail, the summary line and the Data Docs page."""
        from batchmark import config, validation
        from batchmark.definitions import load_definitions

        settings = config.load()
        report = validation.validate_day(settings, load_definitions(settings.definitions_path), _day(), _run_id())
        print(report.summary_line())
        return {"success": report.success, "summary": report.summary_line(), "docs": str(report.docs_index)}

    @task
    def check_accuracy(result: dict[str, Any]) -> str:
        """Fail the run when the stream was out of tolerance: that is the drift alert."""
        if not result["success"]:
            raise AirflowFailException(
                f"stream accuracy out of tolerance: {result['summary']} (report: {result['docs']})"
            )
        return result["summary"]

    check_accuracy(validate_with_gx(wait_for_lake_day() >> spark_recompute()))
