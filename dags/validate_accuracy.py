"""validate_accuracy: Great Expectations measures how accurate the stream was against a day's batch truth.

**When it runs.** On the Asset `batchmark://truth/results`: each time `nightly_recompute` writes a day's
truth, this DAG validates that day. Truth written for several days before it starts (a backfill) is validated
in one run, one mapped task per day (the task's label is the day). Trigger it by hand with the `date` Param
to validate a day again (for instance after changing a tolerance), optionally for some `metrics` only.

    days_to_validate  ->  validate_with_gx[day]  ->  alert_on_drift[day]  ->  check_accuracy[day]

1. days_to_validate: the `date` Param, else the days named by the truth Asset events that triggered the run.
2. validate_with_gx: the GX checkpoint compares stream.results with truth.results for the day (completeness:
   every truth window has a stream row; accuracy: each metric's error within its tolerance), updates the Data
   Docs, appends to quality.accuracy_history and publishes the Asset `batchmark://quality/accuracy_history`.
3. alert_on_drift: runs the drift checks (batchmark.drift: tolerance, completeness, trend and slow drift
   against the metric's own history, rises in late/lost/duplicated/rejected records) and records each change
   of state in quality.alerts -- one alert per change, not one per night -- then sends what is pending to the
   channels (Airflow connections named in BATCHMARK_ALERT_CHANNELS: apprise or smtp). A channel that is down
   keeps its alerts pending; the next run of this DAG or of `deliver_alerts` sends them.
4. check_accuracy: asserts the GX checkpoint's success itself (the GX provider would not fail a task on a
   failed validation) and fails the day's task when a metric failed; the message is the summary line and the
   report's address.

A configuration error (a bad date, an unknown metric, no truth for the day) fails at once; an unreachable
service is retried with exponential backoff. Every failure is recorded in quality.task_failures.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from batchmark import orchestration

TRUTH = orchestration.truth_asset()
ACCURACY = orchestration.accuracy_asset()

with DAG(
    dag_id="validate_accuracy",
    description="GX validation of the stream against a day's batch truth: accuracy report and history",
    schedule=TRUTH,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=2,
    is_paused_upon_creation=False,  # it only runs when truth is written: triggering nightly_recompute is enough
    tags=["batchmark", "validation"],
    params={
        "date": orchestration.date_param("Day to validate. Empty: the days whose batch truth triggered this run."),
        "metrics": Param(
            [],
            type="array",
            items={"type": "string", "pattern": r"^[a-z][a-z0-9_]{0,62}$"},
            title="Metrics",
            description="Validate only these metrics (names from the definitions file). Empty: all of them.",
        ),
    },
    default_args=orchestration.default_args("validate_accuracy"),
    doc_md=__doc__,
) as dag:

    @task
    def days_to_validate() -> list[str]:
        """The `date` Param, else every day named by the triggering truth Asset events."""
        ctx = get_current_context()
        if (ctx["params"] or {}).get("date"):
            return [orchestration.context_day().isoformat()]
        events = (
            [e.extra for e in ctx["triggering_asset_events"].get(TRUTH, [])]
            if ctx.get("triggering_asset_events")
            else []
        )
        days = orchestration.days_from_asset_events(events)
        if not days:
            from batchmark.errors import ConfigError

            raise ConfigError("no day to validate: give the `date` Param (YYYY-MM-DD) when triggering by hand")
        return [d.isoformat() for d in days]

    @task(outlets=[ACCURACY], map_index_template="{{ day }}")
    def validate_with_gx(day: str) -> dict[str, Any]:
        """Run the GX checkpoint for one day; returns pass/fail, the summary line and the Data Docs page."""
        from batchmark import config, validation
        from batchmark.definitions import load_definitions
        from batchmark.windows import parse_day

        ctx = get_current_context()
        ctx["day"] = day  # type: ignore[typeddict-unknown-key]  # the mapped task's label in the UI
        settings = config.load()
        defs = load_definitions(settings.definitions_path).only((ctx["params"] or {}).get("metrics") or [])
        report = validation.validate_day(settings, defs, parse_day(day), orchestration.context_run_id())
        print(report.summary_line())
        ctx["outlet_events"][ACCURACY].extra = {"day": day, "success": report.success}
        return {
            "day": day,
            "success": report.success,
            "summary": report.summary_line(),
            "docs": f"{settings.report_url}/index.html",
        }

    @task(map_index_template="{{ day }}")
    def alert_on_drift(result: dict[str, Any]) -> dict[str, Any]:
        """Record the day's alerts (state changes of the drift checks) and send every pending one."""
        from batchmark import alerts, config
        from batchmark.definitions import load_definitions
        from batchmark.windows import parse_day

        get_current_context()["day"] = result["day"]  # type: ignore[typeddict-unknown-key]
        settings = config.load()
        defs = load_definitions(settings.definitions_path)
        recorded = alerts.evaluate_day(settings, defs, parse_day(result["day"]))
        for a in recorded:
            print(f"{a.title}{' (suppressed: same alert within suppress_days)' if a.suppressed else ''}")
        if not settings.alert_channels:
            print("no alert channel configured (BATCHMARK_ALERT_CHANNELS): alerts are recorded in quality.alerts")
        print(f"{len(recorded)} new alerts; deliveries: {alerts.deliver_pending(settings).line()}")
        return result

    @task(retries=0, map_index_template="{{ day }}")
    def check_accuracy(result: dict[str, Any]) -> str:
        """Fail when the stream was out of tolerance on the day: the accuracy alert."""
        get_current_context()["day"] = result["day"]  # type: ignore[typeddict-unknown-key]
        if result["success"] is not True:  # the checkpoint's own verdict, asserted here
            raise AirflowFailException(f"stream accuracy check failed: {result['summary']} (report: {result['docs']})")
        return result["summary"]

    check_accuracy.expand(result=alert_on_drift.expand(result=validate_with_gx.expand(day=days_to_validate())))
