"""batchmark's Airflow plugin (registered through the ``airflow.plugins`` entry point in pyproject.toml).

It makes the day a run checks visible wherever runs are listed:
- ``NightlyTimetable`` (nightly_recompute's schedule) names scheduled runs after the day they check:
  ``scheduled__2026-11-24`` (Airflow would name it after its run time, the next midnight). A backfill's runs
  keep Airflow's own names (``backfill__<end of the day>``: Airflow 3.3 names them without the timetable);
  their logical date and note give the day;
- ``DayRunIds`` (an API-server middleware) names a manual run triggered with a ``date`` Param and no run id
  ``manual__2026-11-24__<trigger time>``, from the UI's trigger form and the REST API alike;
- ``RunNotes`` (a listener) writes "recomputes 2026-11-24" / "validates ..." into the run's note when the
  scheduler starts it (a note the person gave is kept after it).

It also serves the validation reports (GX Data Docs) over HTTP at ``/batchmark/reports/`` on the API server,
so an alert's link opens in a browser on any machine that reaches Airflow (not a file path on the scheduler).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, date, datetime
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.interval import CronDataIntervalTimetable

from batchmark import orchestration
from batchmark.errors import ConfigError

log = logging.getLogger(__name__)


def days_of_run(dag_run: Any) -> list[Any]:
    """The day(s) a DAG run checks, from its conf, its consumed truth Asset events or its data interval."""
    conf = dag_run.conf or {}
    if conf.get("date") or dag_run.dag_id == "nightly_recompute":
        return [orchestration.day_for_run(conf.get("date"), dag_run.data_interval_start, dag_run.run_after)]
    events = getattr(dag_run, "consumed_asset_events", None) or []
    return orchestration.days_from_asset_events(
        e.extra
        for e in events
        if getattr(getattr(e, "asset", None), "uri", None) == orchestration.TRUTH_ASSET_URI
        or getattr(e, "source_dag_id", None) == "nightly_recompute"
    )


class RunNotes:
    """Listener: notes the day a run checks when the scheduler starts it."""

    @hookimpl
    def on_dag_run_running(self, dag_run: Any, msg: str) -> None:
        if dag_run.dag_id not in orchestration.DAY_DAGS:
            return
        try:
            note = orchestration.run_note(dag_run.dag_id, days_of_run(dag_run))
        except ConfigError as exc:
            note = f"bad date: {exc}"
        except Exception:  # a note is never worth failing the scheduler loop
            log.exception("could not work out the day of %s", dag_run.run_id)
            return
        given = dag_run.note
        if given and note in given:
            return
        dag_run.note = f"{note} | {given}" if given else note


class NightlyTimetable(CronDataIntervalTimetable):
    """A cron data-interval timetable whose scheduled runs are named after the day they check.

    Airflow 3.3 asks the timetable for a backfill run's id only when it re-creates a run (reprocessing); a
    first backfill run keeps Airflow's own name. Both cases name the day here when asked.
    """

    def generate_run_id(self, *, run_type: Any, run_after: Any, data_interval: Any, **extra: Any) -> str:
        from airflow.utils.types import DagRunType

        if data_interval is not None and run_type in (DagRunType.SCHEDULED, DagRunType.BACKFILL_JOB):
            return run_type.generate_run_id(suffix=data_interval.start.astimezone(UTC).date().isoformat())
        return super().generate_run_id(run_type=run_type, run_after=run_after, data_interval=data_interval, **extra)


_TRIGGER_PATH = re.compile(r"^/api/v2/dags/(" + "|".join(orchestration.DAY_DAGS) + r")/dagRuns/?$")


def name_manual_run(body: bytes, now: datetime | None = None) -> bytes:
    """A trigger request's body with a run id naming its day, when it gives a real ``date`` and no run id."""
    try:
        payload = json.loads(body or b"{}")
        day = date.fromisoformat(payload["conf"]["date"]) if isinstance(payload, dict) else None
    except (ValueError, KeyError, TypeError):
        return body  # not ours to judge: Airflow refuses a bad body or date with its own message
    if day is None or payload.get("dag_run_id"):
        return body
    stamp = (now or datetime.now(tz=UTC)).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    payload["dag_run_id"] = f"manual__{day.isoformat()}__{stamp}"
    return json.dumps(payload).encode()


class DayRunIds:
    """ASGI middleware on the API server: fills the run id of a day-checking DAG's trigger (see the module)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not _TRIGGER_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        body = name_manual_run(body)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


def reports_app() -> Any:
    """A read-only app serving the Data Docs site of the GX project (settings.gx_root) as static files."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from batchmark import config

    site = config.load().gx_root / "uncommitted" / "data_docs" / "local_site"
    app = FastAPI(title="batchmark reports", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/reports", StaticFiles(directory=site, html=True, check_dir=False), name="reports")
    return app


class BatchmarkPlugin(AirflowPlugin):
    """batchmark's timetable, run-naming middleware, run-note listener and validation reports."""

    name = "batchmark"
    listeners = [RunNotes()]
    timetables = [NightlyTimetable]
    fastapi_root_middlewares = [{"name": "batchmark_day_run_ids", "middleware": DayRunIds}]
    fastapi_apps = [{"app": reports_app(), "url_prefix": "/batchmark", "name": "batchmark reports"}]
