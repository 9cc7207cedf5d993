"""What the Airflow DAGs share: which day a run checks, the day Param, the Assets, retries and failure records.

A DAG file imports these so that every DAG agrees on them; nothing here runs at import time beyond building
small Airflow objects (the DAG processor imports DAG files often).

Days. ``nightly_recompute`` runs on a cron *data-interval* timetable in the dataset's time zone (UTC unless
``[dataset] timezone`` says otherwise): the run that starts at local midnight of day D covers the interval
[D-1, D), so its logical date is D-1 and that is the day it checks -- the day that has just ended. A run
triggered with the ``date`` Param checks that day; a manual run without one checks the day before it was
triggered. The run's note says which day it checks (set by the plugin in
``batchmark.airflow_plugin`` when the run starts), so the runs list shows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from batchmark.errors import BatchmarkError, ConfigError, ServiceUnavailable

# The nightly schedule: midnight of the dataset's time zone, one data interval per day.
NIGHTLY_CRON = "0 0 * * *"
TRUTH_ASSET_URI = "batchmark://truth/results"
ACCURACY_ASSET_URI = "batchmark://quality/accuracy_history"
ACCURACY_VIEW = "/batchmark/accuracy"  # the plugin's Accuracy view (batchmark.airflow_plugin)
DAY_DAGS = ("nightly_recompute", "validate_accuracy")  # every DAG of the product; each checks a day
OWNER = "batchmark"


def day_for_run(
    date_param: str | None,
    data_interval_start: datetime | None,
    run_after: datetime | None = None,
    zone: str | None = None,
) -> date:
    """The day a run checks: the ``date`` Param, else its data interval's start day, else the day before it ran
    -- days of the dataset's time zone (``[dataset] timezone``; `zone` overrides it).

    ``date_param`` is refused with a message that says what to fix when it is not a real day.
    """
    from zoneinfo import ZoneInfo

    from batchmark.windows import parse_day

    if date_param:
        return parse_day(date_param)
    tz = ZoneInfo(zone or dataset_timezone())
    if data_interval_start is not None:
        return data_interval_start.astimezone(tz).date()
    after = run_after or datetime.now(tz=UTC)
    return after.astimezone(tz).date() - timedelta(days=1)


def dataset_timezone() -> str:
    """The time zone of the configured dataset's days; UTC when the definitions do not load (the task that
    needs them fails with their error instead)."""
    from batchmark import config
    from batchmark.definitions import load_definitions

    try:
        return load_definitions(config.load().definitions_path).dataset.timezone
    except BatchmarkError:
        return "UTC"


def days_from_asset_events(events: Iterable[Mapping[str, Any] | None]) -> list[date]:
    """The days named by truth-Asset events' extras ({"day": "YYYY-MM-DD"}), sorted, each once."""
    from batchmark.windows import parse_day

    days = {parse_day(str(extra["day"])) for extra in events if extra and extra.get("day")}
    return sorted(days)


def run_note(dag_id: str, days: Iterable[date]) -> str:
    """The note a run carries in the UI's runs list: which day(s) it checks."""
    listed = sorted(set(days))
    if not listed:
        return "checks: no day given"
    if dag_id == "nightly_recompute":
        return f"recomputes {', '.join(d.isoformat() for d in listed)}"
    links = ", ".join(f"[{d.isoformat()}]({ACCURACY_VIEW}?day={d.isoformat()})" for d in listed)
    return f"validates {', '.join(d.isoformat() for d in listed)} · accuracy report: {links}"  # notes are Markdown


def truth_asset() -> Any:
    """The Asset nightly_recompute publishes when a day's batch truth is written (extra: {"day": ...})."""
    from airflow.sdk import Asset

    return Asset(name="batch_truth", uri=TRUTH_ASSET_URI, group="batchmark")


def accuracy_asset() -> Any:
    """The Asset validate_accuracy publishes when a day's accuracy is recorded (extra: {"day", "success"})."""
    from airflow.sdk import Asset

    return Asset(name="stream_accuracy", uri=ACCURACY_ASSET_URI, group="batchmark")


def date_param(description: str) -> Any:
    """The ``date`` Param: empty, or a real calendar day. ``format: date`` makes the trigger form a date picker,
    and Airflow's JSON-schema check refuses 2026-02-30 before a run is created (the form and the REST API alike)."""
    from airflow.sdk import Param

    return Param(
        None,
        type=["null", "string"],
        format="date",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        maxLength=10,  # the pattern's $ would let a trailing newline through
        title="Day (UTC)",
        description=description,
    )


def retry_policy() -> Any:
    """Configuration errors fail at once (retrying cannot fix them); an unreachable service is retried."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

    return ExceptionRetryPolicy(
        rules=[
            RetryRule(
                exception=ConfigError,
                action=RetryAction.FAIL,
                reason="a configuration error: fix what the message says and trigger the run again",
            ),
            RetryRule(exception=ServiceUnavailable, action=RetryAction.RETRY, reason="a service was not reachable"),
        ],
    )


def default_args(dag_id: str) -> dict[str, Any]:
    """Owner, retries with exponential backoff for transient errors, and the failure record, for every task."""

    def on_failure(context: dict[str, Any]) -> None:
        record_failure(dag_id, context)

    return {
        "owner": OWNER,
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "retry_policy": retry_policy(),
        "on_failure_callback": on_failure,
    }


def record_failure(dag_id: str, context: Mapping[str, Any]) -> None:
    """Failure callback: record which task failed, for which day, and why (quality.task_failures)."""
    from batchmark import config, storage

    ti = context.get("task_instance") or context.get("ti")
    params = context.get("params") or {}
    day: str | None = None  # an Asset-triggered validation may cover several days; its note lists them
    if dag_id == "nightly_recompute" or params.get("date"):
        try:
            day = day_for_run(params.get("date"), context.get("data_interval_start"), None).isoformat()
        except ConfigError:
            day = str(params.get("date"))[:10]  # the bad date itself is what failed
    storage.record_task_failure(
        config.load().database_url,
        dag_id=dag_id,
        task_id=getattr(ti, "task_id", "?"),
        run_id=str(context.get("run_id")),
        day=day,
        error=repr(context.get("exception"))[:2000],
    )


def context_day() -> date:
    """The day the running task's DAG run checks (inside a task)."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    dag_run = ctx.get("dag_run")
    return day_for_run(
        (ctx.get("params") or {}).get("date"),
        ctx.get("data_interval_start"),
        getattr(dag_run, "run_after", None),
    )


def context_run_id() -> str:
    """The running DAG run's id, safe to put in a table or a file name."""
    import re

    from airflow.sdk import get_current_context

    return re.sub(r"[^A-Za-z0-9_.:+-]", "_", str(get_current_context()["run_id"]))[:200]
