"""Error attribution: a day built with known numbers of late, duplicated and lost events, attributed exactly.

The stream drops late records, counts duplicate copies and never sees lost events (they exist only in the
archive, the system of record). The batch must say, per window, how much of the stream's difference comes
from each, and that the exact kinds' sketch term is zero.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pytest

from batchmark import spark, storage, validation
from tests.integration.conftest import streamed_day

DAY = date(2026, 11, 20)
EXACT = ("count", "sum", "mean", "min", "max")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def attributed(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    with streamed_day(
        "events-attribution",
        DAY,
        home,
        events=15_000,
        tenants=5,
        out_of_order=0.03,
        late=0.01,
        duplicates=0.01,
        lost=0.01,
        malformed=0.002,
        seed=23,
    ) as (settings, defs, manifest, _):
        assert manifest.late > 20 and manifest.duplicates > 20 and manifest.lost > 20
        result = spark.submit(settings, DAY, "attribution")
        yield settings, defs, manifest, result


def _rows(url: str, sql: str, *args: object) -> list[tuple]:
    with storage.transaction(url) as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_counts_of_late_duplicate_and_lost_events_match_the_dataset(attributed, pg_url: str) -> None:  # noqa: ANN001
    _, _, manifest, result = attributed
    assert result["archive"] and result["truth_events"] == manifest.distinct_events + manifest.lost
    [(late, dup, lost)] = _rows(
        pg_url,
        """SELECT sum(n_late), sum(n_dup), sum(n_lost) FROM quality.window_accuracy
                                           WHERE day = %s AND metric = 'jobs'""",
        DAY,
    )
    assert (late, dup, lost) == (manifest.late, manifest.duplicates, manifest.lost)
    [(stream_late,)] = _rows(
        pg_url, "SELECT sum(n_late) FROM stream.late_events WHERE day = %s AND metric = 'jobs'", DAY
    )
    assert stream_late == manifest.late  # the stream's own count agrees with the batch's reconstruction


def test_every_window_difference_is_fully_attributed(attributed, pg_url: str) -> None:  # noqa: ANN001
    _, defs, _, _ = attributed
    kinds = {m.name: m.kind for m in defs.metrics}
    rows = _rows(
        pg_url,
        """SELECT c.metric, c.batch_value, c.stream_value, a.lost_effect, a.dup_effect,
                                   a.late_effect, a.sketch_effect, a.n_lost, a.n_dup, a.n_late
                            FROM quality.comparison c
                            JOIN quality.window_accuracy a USING (metric, group_key, window_start)
                            WHERE c.day = %s AND c.stream_value IS NOT NULL""",
        DAY,
    )
    assert len(rows) > 1000
    for metric, truth, stream, lost, dup, late, sketch, n_lost, n_dup, n_late in rows:
        if None in (lost, dup, late, sketch):
            continue  # an undefined value (e.g. the mean of no events) along the way
        assert stream - truth == pytest.approx(lost + dup + late + sketch, rel=1e-9, abs=1e-6)
        if kinds[metric] in EXACT:
            assert sketch == 0, metric  # exact kinds: online and offline agree on the events the stream counted
        if kinds[metric] == "count":
            assert (lost, dup, late) == (-n_lost, n_dup, -n_late)


def _oracle_values(records, kind: str, column: str | None):  # noqa: ANN001, ANN202
    """{(tenant, window start): value} of one exact kind over a frame of records, computed here with pandas
    and math.fsum: independent of batchmark's aggregates."""
    import math

    out = {}
    for (tenant, start), g in records.groupby(["tenant", "start"]):
        x = g[column] if column else None
        out[(tenant, int(start))] = {
            "count": lambda: float(len(g)),  # noqa: B023
            "sum": lambda: math.fsum(x),  # noqa: B023
            "mean": lambda: math.fsum(x) / len(x),  # noqa: B023
            "min": lambda: float(x.min()),  # noqa: B023
            "max": lambda: float(x.max()),  # noqa: B023
        }[kind]()
    return out


def test_each_windows_lost_duplicate_and_late_effects_match_an_oracle_from_the_manifest(attributed, pg_url) -> None:  # noqa: ANN001
    """Per window and for every exact kind, the effects the Spark job attributed equal the differences of values
    recomputed here from the archive and the generator's manifest: lost ids removed (U), duplicate copies added
    (R), late records removed (S). lost = v(U) - v(T), duplicates = v(R) - v(U), late = v(S) - v(R)."""
    from collections import Counter

    import orjson
    import pandas as pd

    settings, defs, manifest, _ = attributed
    with open(settings.archive_file(DAY), "rb") as fh:
        truth = pd.DataFrame([orjson.loads(line) for line in fh if line.strip()])
    truth["t"] = pd.to_datetime(truth["event_time"], utc=True, format="ISO8601").astype("datetime64[ms, UTC]")
    truth["t"] = truth["t"].astype("int64")
    truth["value"] = truth["cpu"] * truth["duration_s"]  # cpu_seconds' value expression
    landed = truth[~truth["event_id"].isin(set(manifest.lost_event_ids))]
    copies = landed.set_index("event_id").loc[manifest.duplicate_event_ids].reset_index()
    records = pd.concat([landed, copies], ignore_index=True)
    late = Counter(manifest.late_event_ids)  # one entry per late record; copies of an event are identical
    seen = records[records.groupby("event_id").cumcount() >= records["event_id"].map(late).fillna(0)]
    assert (len(manifest.lost_event_ids), len(copies), len(records) - len(seen)) == (
        manifest.lost,
        manifest.duplicates,
        manifest.late,
    )

    columns = {
        "jobs": None,
        "cpu_seconds": "value",
        "mem_gb_mean": "mem_gb",
        "cpu_min": "cpu",
        "duration_max": "duration_s",
    }
    checked = 0
    for name, column in columns.items():
        m = defs.metric(name)
        assert m.window_ms == 60_000 and m.allowed_lateness_ms == 30_000  # the manifest's rule for "late"
        frames = {}
        for label, frame in (("T", truth), ("U", landed), ("R", records), ("S", seen)):
            frame = frame.assign(start=frame["t"] - frame["t"] % m.window_ms)
            frames[label] = _oracle_values(frame, m.kind, column)
        rows = _rows(
            pg_url,
            """SELECT group_key, (extract(epoch FROM window_start) * 1000)::bigint, lost_effect, dup_effect,
                      late_effect FROM quality.window_accuracy WHERE day = %s AND metric = %s""",
            DAY,
            name,
        )
        assert len(rows) == len(frames["T"]), name
        for key, start, lost, dup, late_effect in rows:
            empty = 0.0 if m.kind in ("count", "sum") else None  # a count or sum of nothing is 0; a mean undefined
            v = {label: frames[label].get((key, start), empty) for label in "TURS"}
            expected = [
                None if v[b] is None or v[a] is None else v[b] - v[a] for a, b in (("T", "U"), ("U", "R"), ("R", "S"))
            ]
            assert [lost, dup, late_effect] == expected, (name, key, start, v)
            checked += sum(e not in (None, 0) for e in expected)
    assert checked > 100  # non-zero effects were compared, not only zeros


def test_validation_fails_and_says_why(attributed) -> None:  # noqa: ANN001
    settings, defs, manifest, _ = attributed
    report = validation.validate_day(settings, defs, DAY, "attribution-check")
    jobs = {m.metric: m for m in report.metrics}["jobs"]
    assert not report.success and not jobs.success and jobs.over_tolerance > 0
    assert (jobs.late_events, jobs.duplicate_events, jobs.lost_events) == (
        manifest.late,
        manifest.duplicates,
        manifest.lost,
    )
    assert "late" in report.summary_line() and "lost" in report.summary_line()


def test_the_day_alerts_through_the_dag_to_a_webhook_and_an_email(attributed, airflow_db, monkeypatch) -> None:  # noqa: ANN001
    """validate_accuracy (dag.test) on the day with planted late, duplicated and lost events: a real webhook
    server and a real SMTP server get one alert per failing (metric, check), saying what happened and why."""
    from airflow.dag_processing.dagbag import DagBag

    from batchmark.broker import free_port
    from tests.receivers import Mailbox, Webhook, channel_env

    settings, defs, manifest, _ = attributed
    hook, mailbox = Webhook(free_port()).start(), Mailbox().start()
    try:
        for k, v in channel_env(hook, mailbox).items():
            monkeypatch.setenv(k, v)
        bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        run = bag.get_dag("validate_accuracy").test(run_conf={"date": DAY.isoformat()})
    finally:
        hook.stop()
        mailbox.stop()

    states = {ti.task_id: str(ti.state).split(".")[-1].lower() for ti in run.get_task_instances()}
    assert states == {
        "days_to_validate": "success",
        "validate_with_gx": "success",
        "alert_on_drift": "success",
        "check_accuracy": "failed",  # the accuracy verdict itself
    }
    rows = _rows(
        settings.database_url,
        """SELECT DISTINCT ON (metric) metric, incomplete + impossible + missing, within_tolerance
           FROM quality.accuracy_history WHERE day = %s ORDER BY metric, created_at DESC""",
        DAY,
    )
    expected = {(m, "completeness") for m, bad, _ in rows if bad} | {(m, "tolerance") for m, _, ok in rows if not ok}
    assert {(m, "completeness") for m in (x.name for x in defs.metrics)} <= expected  # every metric lost events
    got = {tuple(b["title"].split(": ")[1].split(" on ")[0].split(" ")) for b in hook.bodies}
    assert got == expected  # exactly one alert per failing (metric, check), and nothing else
    assert {s for s in mailbox.bodies()} == {b["title"] for b in hook.bodies}
    jobs = next(b["message"] for b in hook.bodies if b["title"].endswith(f"jobs completeness on {DAY}"))
    assert f"Causes: {manifest.late} late, {manifest.lost} lost, {manifest.duplicates} duplicated events" in jobs
    assert "Report: http://127.0.0.1:8080/batchmark/reports/validations/accuracy_jobs/" in jobs
    packing = next(b["message"] for b in hook.bodies if b["title"].endswith(f"node_packing completeness on {DAY}"))
    assert "node_packing (binpack)" in packing and "incomplete" in packing
