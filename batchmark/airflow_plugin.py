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

It also serves, to signed-in Airflow users only, the Accuracy view at ``/batchmark/accuracy`` (an entry of the
UI's navigation) and the validation reports (GX Data Docs) at ``/batchmark/reports/``, so an alert's link opens
in a browser on any machine that reaches Airflow (not a file path on the scheduler).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.interval import CronDataIntervalTimetable
from fastapi import Request  # module level: FastAPI resolves the routes' (postponed) annotations here
from fastapi.responses import Response

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
            day = data_interval.start.astimezone(getattr(self, "_timezone", UTC)).date()  # the timetable's day
            return run_type.generate_run_id(suffix=day.isoformat())
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


async def signed_in(request: Any) -> Any:
    """None when the request carries a valid Airflow JWT (the UI's ``_token`` cookie or a Bearer header);
    otherwise the response to give: a browser goes to Airflow's login page (and comes back), others get 401."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api.security import resolve_user_from_token
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, RedirectResponse

    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE_NAME_JWT_TOKEN)
    try:
        await resolve_user_from_token(token)
    except HTTPException as exc:
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    return None


def _file(root: Path, path: str) -> Any:
    """A file under root (a directory's index.html), or 404; nothing outside root."""
    from fastapi.responses import FileResponse, JSONResponse

    try:
        target = (root / (path or "index.html")).resolve()
    except (ValueError, OSError):  # e.g. a NUL byte in the path
        return JSONResponse({"detail": "not a path"}, status_code=404)
    if target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(root) or not target.is_file():
        return JSONResponse({"detail": f"nothing at {path!r}"}, status_code=404)
    return FileResponse(target)


def batchmark_app() -> Any:
    """batchmark's pages on the API server, each for signed-in Airflow users only (Airflow does not
    authenticate a plugin's app by itself: every route checks the caller with Airflow's auth manager):
    - /batchmark/accuracy: the Accuracy view (batchmark.accuracy_view), in the UI's navigation;
    - /batchmark/live (and live.json, which it polls): the windows the stream holds open, refreshing;
    - /batchmark/reports/...: the GX Data Docs site of the dataset's project (settings.gx_project), offline-ready;
    - /batchmark/static/vendor/...: the vendored scripts and styles those pages load.
    """
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    from batchmark import accuracy_view, config
    from batchmark.definitions import load_definitions
    from batchmark.reports import VENDOR

    settings = config.load()
    dataset = load_definitions(settings.definitions_path).dataset.name
    site = (settings.gx_project(dataset) / "uncommitted" / "data_docs" / "local_site").resolve()
    app = FastAPI(title="batchmark", docs_url=None, redoc_url=None, openapi_url=None)

    # Database reads run in the thread pool: the API server's event loop also serves the UI and the tasks.
    @app.get("/reports/{path:path}")
    async def report(path: str, request: Request) -> Response:
        return await signed_in(request) or _file(site, path)

    @app.get("/static/vendor/{path:path}")
    async def vendor(path: str, request: Request) -> Response:
        return await signed_in(request) or _file(VENDOR.resolve(), path)

    def accuracy_page(day: str | None, days: int) -> Response:
        from batchmark.definitions import load_definitions
        from batchmark.errors import ConfigError
        from batchmark.windows import parse_day

        settings = config.load()
        try:
            focus = parse_day(day) if day else None
            if not 1 <= days <= 400:
                raise ConfigError(f"days must be between 1 and 400, not {days}")
        except ConfigError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        defs = load_definitions(settings.definitions_path)
        data = accuracy_view.load(
            settings.database_url, defs, settings.report_url, focus, days, settings.decision_days, settings.events_topic
        )
        return HTMLResponse(accuracy_view.render(data, assets="static/vendor", page_url="accuracy"))

    @app.get("/accuracy")
    async def accuracy(request: Request, day: str | None = None, days: int = 30) -> Response:
        return await signed_in(request) or await run_in_threadpool(accuracy_page, day, days)

    @app.get("/live")
    async def live(request: Request) -> Response:
        return await signed_in(request) or HTMLResponse(accuracy_view.render_live())

    @app.get("/live.json")
    async def live_json(request: Request) -> Response:
        refused = await signed_in(request)
        if refused:
            return refused
        return JSONResponse(await run_in_threadpool(accuracy_view.live_rows, config.load().database_url))

    return app


class BatchmarkPlugin(AirflowPlugin):
    """batchmark's timetable, run-naming middleware, run-note listener, Accuracy view and validation reports."""

    name = "batchmark"
    listeners = [RunNotes()]
    timetables = [NightlyTimetable]
    fastapi_root_middlewares = [{"name": "batchmark_day_run_ids", "middleware": DayRunIds}]
    fastapi_apps = [{"app": batchmark_app(), "url_prefix": "/batchmark", "name": "batchmark"}]
    external_views = [  # the Accuracy view in the UI's navigation (an iframe that runs its own scripts)
        {"name": "Accuracy", "href": "/batchmark/accuracy", "url_route": "accuracy", "destination": "nav"}
    ]
