"""The demo: one generated day through every real component, on embedded defaults.

broker (Tansu) -> topics -> generate a day -> Faust worker -> replay -> wait until the day is landed and
closed -> the nightly DAG (Spark recompute -> GX validation) via `airflow dags test` -> summary.
Everything it starts it stops at the end, unless --keep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from batchmark import config, storage
from batchmark.airflow_env import airflow_bin, airflow_env, migrate
from batchmark.broker import EmbeddedBroker, ensure_settings_topics
from batchmark.config import REPO_ROOT, Settings
from batchmark.definitions import Definitions, load_definitions
from batchmark.errors import BatchmarkError
from batchmark.generator import GeneratorConfig, generate
from batchmark.lake import day_completeness, day_dir
from batchmark.orchestration import DAY_DAGS
from batchmark.pg import ensure_postgres
from batchmark.replay import replay
from batchmark.spark import check_java
from batchmark.stream_processor import READY_LINE


def reset_stream_epoch(settings: Settings, day: date) -> None:
    """A new (empty) broker restarts offsets at 0, and the demo replaces its day entirely: forget the old
    checkpoints and watermarks, and the day's stream rows and lake files from earlier runs."""
    with storage.transaction(settings.database_url) as cur:
        cur.execute("DELETE FROM stream.checkpoints WHERE topic = %s", (settings.events_topic,))
        cur.execute("DELETE FROM stream.results WHERE day = %s", (day,))
        cur.execute("DELETE FROM stream.late_events WHERE day = %s", (day,))
    for path in (settings.events_lake / "_watermarks").glob(f"{settings.events_topic}-p*.json"):
        path.unlink()
    shutil.rmtree(day_dir(settings.events_lake, day), ignore_errors=True)


def start_worker(settings: Settings, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The Faust worker as a child process, logging to log_path; `env` adds to (or overrides) the environment."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO_ROOT)}
    faust = str(Path(sys.executable).parent / "faust")
    return subprocess.Popen(
        [faust, "-A", "streaming.app", "worker", "--without-web", "-l", "info"],
        cwd=REPO_ROOT,
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )


def log_size(log_path: Path) -> int:
    """Where a log ends now: pass it to wait_until_ready when the worker starts before the wait does."""
    return log_path.stat().st_size if log_path.exists() else 0


def wait_until_ready(
    worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 120, since: int | None = None
) -> float:
    """Block until the worker's events consumer has joined its group and has its partitions; returns seconds waited.

    Reads the log from byte `since` (the log's size when the worker was started); without it, from the log's
    end now, which misses a ready line the worker wrote before this call (stream_processor.READY_LINE).
    """
    t0 = time.monotonic()
    start = log_size(log_path) if since is None else since
    while time.monotonic() - t0 < timeout_s:
        if worker.poll() is not None:
            raise BatchmarkError(f"the stream worker exited with code {worker.returncode}; see {log_path}")
        with open(log_path, "rb") as fh:
            fh.seek(start)
            if READY_LINE.encode() in fh.read():
                return time.monotonic() - t0
        time.sleep(0.3)
    raise BatchmarkError(f"the stream worker was not ready within {timeout_s:.0f}s; see {log_path}")


def wait_for_day(
    settings: Settings,
    day: date,
    lateness_ms: int,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float = 900,
) -> float:
    """Block until every partition has landed and closed the day (a day of the dataset's calendar); returns the
    seconds waited."""
    calendar = load_definitions(settings.definitions_path).dataset.calendar
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if worker.poll() is not None:
            raise BatchmarkError(f"the stream worker exited with code {worker.returncode}; see {log_path}")
        done, _ = day_completeness(
            settings.events_lake, settings.events_topic, day, settings.partitions, lateness_ms, calendar
        )
        if done:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise BatchmarkError(f"the stream worker did not finish {day} within {timeout_s:.0f}s; see {log_path}")


def stream_day(
    settings: Settings, defs: Definitions, data: Path, day: date, log_path: Path, timeout_s: float = 240
) -> float:
    """Start a worker, replay `data` into the events topic, wait until `day` is landed and closed, stop it.

    Returns the seconds from the start of the replay to the day being complete.
    """
    worker = start_worker(settings, log_path)
    try:
        wait_until_ready(worker, log_path)
        t0 = time.monotonic()
        replay(data, settings.bootstrap_servers, settings.events_topic, defs, progress=False)
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)
        wait_for_day(settings, day, lateness, worker, log_path, timeout_s=timeout_s)
        return time.monotonic() - t0
    finally:
        stop(worker)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def demo_home(settings: Settings) -> Path:
    """The demo's own runtime home (lake, Airflow metadata, logs; and so its own database): a running
    `batchmark up` stack or another checkout is never touched by a demo."""
    return settings.home / "demo"


def run_dag_test(settings: Settings, dag_id: str, day: date, log_path: Path) -> int:
    """`airflow dags test DAG -c {"date": day}` in the demo's own Airflow home; returns its exit code."""
    env = {**os.environ, **airflow_env(settings)}
    with open(log_path, "wb") as fh:
        return subprocess.run(
            [airflow_bin(), "dags", "test", dag_id, "-c", json.dumps({"date": day.isoformat()})],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        ).returncode


def run_demo(day: date, gen: GeneratorConfig, keep: bool = False) -> int:
    """Run the whole pipeline for one generated day and print where the report is."""
    check_java()
    os.environ["BATCHMARK_HOME"] = str(demo_home(config.load()))
    settings = config.load()
    home = settings.home
    (home / "logs").mkdir(parents=True, exist_ok=True)
    os.environ["DATABASE_URL"] = ensure_postgres(settings)
    broker = worker = None
    started_broker = not os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if started_broker:
            broker = EmbeddedBroker(log_path=home / "logs" / "broker.log", die_with_parent=not keep).start()
            os.environ["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
        settings = config.load()
        print(
            f"[1/5] broker {settings.bootstrap_servers} ({'embedded Tansu' if broker else 'external'}), "
            f"postgres {storage.db_name(settings.database_url)}, home {home} (the demo's own)"
        )
        ensure_settings_topics(settings)
        if started_broker:
            reset_stream_epoch(settings, day)
            print(f"      a fresh broker: {day}'s earlier stream results and lake files are replaced by this run")
        defs = load_definitions(settings.definitions_path)
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)

        worker_log = home / "logs" / "worker.log"
        worker_log_start = log_size(worker_log)
        worker = start_worker(settings, worker_log)  # it joins its group while the day is generated
        data = home / "data" / f"events-{day.isoformat()}.jsonl"
        manifest = generate(gen, data, archive=settings.archive_file(day))
        print(
            f"[2/5] generated {manifest.records} records for {day} -> {data} "
            f"({manifest.malformed} malformed, {manifest.late} late, {manifest.duplicates} duplicates, "
            f"{manifest.lost} lost; archive {settings.archive_file(day)})"
        )

        wait_until_ready(worker, worker_log, since=worker_log_start)  # it may be ready since long
        t0 = time.monotonic()
        stats = replay(data, settings.bootstrap_servers, settings.events_topic, defs)
        waited = wait_for_day(settings, day, lateness, worker, worker_log)
        stream_s = time.monotonic() - t0
        print(
            f"[3/5] stream: {stats.records} records replayed and processed in {stream_s:.1f}s "
            f"({stats.records / stream_s:,.0f} records/s, replay included; worker log {worker_log})"
        )

        print("[4/5] DAGs nightly_recompute (Spark) then validate_accuracy (GX) via `airflow dags test` ...")
        migrate(settings)
        t1 = time.monotonic()
        logs = {dag_id: home / "logs" / f"{dag_id}-{day.isoformat()}.log" for dag_id in DAY_DAGS}
        rcs: dict[str, int] = {}
        tasks: dict[str, float] = {}
        for dag_id in DAY_DAGS:
            rcs[dag_id] = run_dag_test(settings, dag_id, day, logs[dag_id])
            tasks.update(task_seconds(settings, dag_id))
            if rcs[dag_id] != 0 and dag_id == "nightly_recompute":
                break  # no truth, nothing to validate
        dag_s = time.monotonic() - t1
        print(
            f"      DAGs finished in {dag_s:.0f}s with exit codes {rcs} (logs {', '.join(map(str, logs.values()))}); "
            "task seconds: " + ", ".join(f"{t} {s:.1f}" for t, s in tasks.items())
        )

        summary = latest_accuracy(settings.database_url, day, settings.events_topic)
        print(f"[5/5] {summary['line']}")
        print(f"      validation report: {summary['report']}")
        raised = day_alerts(settings.database_url, day)
        print(
            f"      alerts: {len(raised)} for {day}"
            + "".join(f"\n        {t}" for t in raised)
            + (
                "\n      (`batchmark alerts` lists them; README 'Alerts' says how to send them somewhere)"
                if raised
                else ""
            )
        )
        figures = {
            "day": day.isoformat(),
            "records": stats.records,
            "windows": summary["windows"],
            "stream_seconds": round(stream_s, 1),
            "stream_records_per_s": round(stats.records / stream_s),
            "dag_seconds": round(dag_s, 1),
            "task_seconds": tasks,
            "success": summary["success"],
            "waited_s": round(waited, 1),
        }
        (home / "demo-figures.json").write_text(json.dumps(figures, indent=1))
        # an accuracy FAIL is a finding the demo reports, not a demo failure; a DAG that could not run is
        recomputed = rcs.get("nightly_recompute") == 0
        return 0 if recomputed and (rcs.get("validate_accuracy") == 0 or summary["windows"]) else 1
    finally:
        if keep:
            print(
                f"--keep: broker {os.environ.get('KAFKA_BOOTSTRAP_SERVERS')} and worker "
                f"(pid {worker.pid if worker else '-'}) are still running"
            )
        else:
            stop(worker)
            if broker:
                broker.stop()


def task_seconds(settings: Settings, dag_id: str) -> dict[str, float]:
    """Durations of the tasks of a DAG's newest run, from Airflow's metadata DB (SQLite only)."""
    import sqlite3

    db = settings.airflow_home / "airflow.db"
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            """SELECT task_id, (julianday(end_date) - julianday(start_date)) * 86400 FROM task_instance
               WHERE dag_id = ? AND run_id = (SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)""",
            (dag_id, dag_id),
        ).fetchall()
    return {task: round(s, 1) for task, s in rows if s is not None}


def latest_accuracy(url: str, day: date, topic: str = "events") -> dict[str, object]:
    """The newest validation of a day from quality.accuracy_history, as one line (validation's one wording),
    with the day's rejected records."""
    from batchmark.validation import MetricAccuracy, rejections_text, summary_line

    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT metric, success, windows, missing, over_tolerance, max_error, mean_error, tolerance, kind,
                      late_events, duplicate_events, lost_events, incomplete, impossible, report_url
               FROM quality.accuracy_history
               WHERE day = %s AND run_id = (SELECT run_id FROM quality.accuracy_history WHERE day = %s
                                            ORDER BY created_at DESC LIMIT 1)
               ORDER BY metric""",
            (day, day),
        )
        rows = cur.fetchall()
        rejected = storage.day_rejections(cur, day, topic)
    if not rows:
        return {"line": f"no validation recorded for {day}", "report": "-", "success": False, "windows": 0}
    metrics = [MetricAccuracy(*r[:12], incomplete=r[12], impossible=r[13]) for r in rows]
    ok = all(m.success for m in metrics)
    return {
        "line": summary_line(day, ok, metrics) + "; " + rejections_text(rejected),
        "report": rows[0][14],
        "success": ok,
        "windows": sum(m.windows for m in metrics),
    }


def day_alerts(url: str, day: date) -> list[str]:
    """The titles of the alerts recorded for a day (the validation DAG's alert_on_drift task records them)."""
    with storage.transaction(url) as cur:
        cur.execute("SELECT title FROM quality.alerts WHERE day = %s ORDER BY id", (day,))
        return [t for (t,) in cur.fetchall()]
