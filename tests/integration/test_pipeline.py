"""One generated day through every real component: Tansu broker, Faust worker, lake, Spark, Postgres, GX, Airflow.

The day has out-of-order events (within the lateness) and malformed records but no late events and no
duplicates, so the stream must equal the batch truth exactly, window by window.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from datetime import date
from pathlib import Path

import orjson
import pytest

from batchmark import spark, storage, validation
from batchmark.definitions import load_definitions
from tests.integration.conftest import streamed_day as _streamed_day

DAY = date(2026, 11, 24)
pytestmark = pytest.mark.timeout(900)


async def _read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 30) -> list[dict]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: list[dict] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < expect and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return out


async def _read_positions(
    bootstrap: str, topic: str, expect: int, timeout_s: float = 30
) -> dict[tuple[int, int], bytes]:
    """{(partition, offset): raw value} of a topic's first `expect` records."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: dict[tuple[int, int], bytes] = {}
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < expect and loop.time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.update({(r.partition, r.offset): r.value for r in records})
    finally:
        await consumer.stop()
    return out


def _data_file(settings) -> Path:  # noqa: ANN001
    """The generated file streamed_day replayed (conftest.streamed_day names it after the topic and day)."""
    return Path(os.environ["BATCHMARK_HOME"]) / f"{settings.events_topic}-{DAY}.jsonl"


@pytest.fixture(scope="module")
def streamed_day(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    """A day with out-of-order and malformed records, but nothing late, duplicated or lost."""
    with _streamed_day(
        "events-pipeline", DAY, home, events=12_000, tenants=6, out_of_order=0.05, malformed=0.004, seed=11
    ) as streamed:
        _, _, manifest, _ = streamed
        assert manifest.late == 0 and manifest.duplicates == 0 and manifest.lost == 0 and manifest.malformed > 10
        yield streamed


def test_malformed_records_land_in_the_dlq_with_their_reason(streamed_day) -> None:  # noqa: ANN001
    settings, _, manifest, worker = streamed_day
    dead = asyncio.run(_read_topic(settings.bootstrap_servers, settings.dlq_topic, manifest.malformed))
    assert len(dead) == manifest.malformed
    by_reason: dict[str, int] = {}
    for d in dead:
        by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        assert d["detail"] and d["topic"] == settings.events_topic
        assert base64.b64decode(d["raw_b64"])  # the raw record is kept
    assert by_reason == manifest.malformed_by_reason
    # which records and why: each dead letter is one malformed line of the file, with the reason it was made for
    data = _data_file(settings)
    lines = data.read_bytes().split(b"\n")
    expected = sorted((lines[i], reason) for i, reason in manifest.malformed_lines)
    assert sorted((base64.b64decode(d["raw_b64"]), d["reason"]) for d in dead) == expected
    # and where: (partition, offset) of each dead letter holds exactly that record in the events topic
    events = asyncio.run(_read_positions(settings.bootstrap_servers, settings.events_topic, manifest.records))
    assert len({(d["partition"], d["offset"]) for d in dead}) == len(dead)
    for d in dead:
        assert events[(d["partition"], d["offset"])] == base64.b64decode(d["raw_b64"])
    assert worker.poll() is None  # the worker kept going


def test_stream_results_count_every_valid_event_once(streamed_day, pg_url: str) -> None:  # noqa: ANN001
    _, _, manifest, _ = streamed_day
    stream = storage.fetch_results(pg_url, "stream", DAY)
    jobs = sum(n for (metric, _, _), (_, n) in stream.items() if metric == "jobs")
    assert jobs == manifest.valid_events == manifest.records - manifest.malformed
    # per window: the valid lines of the file, counted here by (tenant, minute)
    from collections import Counter
    from datetime import datetime

    bad = {i for i, _ in manifest.malformed_lines}
    expected: Counter[tuple[str, int]] = Counter()
    for i, line in enumerate(_data_file(streamed_day[0]).read_bytes().splitlines()):
        if i not in bad:
            rec = orjson.loads(line)
            ms = int(datetime.fromisoformat(rec["event_time"].replace("Z", "+00:00")).timestamp() * 1000)
            expected[(rec["tenant"], ms - ms % 60_000)] += 1
    got = {
        (key, int(start.timestamp() * 1000)): (value, n)
        for (metric, key, start), (value, n) in stream.items()
        if metric == "jobs"
    }
    assert got == {k: (float(n), n) for k, n in expected.items()}  # every window: its value and its events


def test_truth_equals_stream_on_exact_kinds_sketches_in_bounds_rerun_identical(streamed_day, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, manifest, _ = streamed_day
    first = spark.submit(settings, DAY, "test-run-1")
    truth1 = storage.fetch_results(pg_url, "truth", DAY)
    second = spark.submit(settings, DAY, "test-run-2")
    truth2 = storage.fetch_results(pg_url, "truth", DAY)
    assert first["rows"] == second["rows"] == len(truth1) > 0
    assert truth1 == truth2
    assert first["truth_events"] == manifest.valid_events and first["rejected"] == {}
    stream = storage.fetch_results(pg_url, "stream", DAY)
    assert stream.keys() == truth1.keys()  # every window of every metric, no more, no less
    exact = {m.name for m in defs.metrics if m.kind in ("count", "sum", "mean", "min", "max")}
    assert {k: v for k, v in stream.items() if k[0] in exact} == {k: v for k, v in truth1.items() if k[0] in exact}
    with storage.transaction(pg_url) as cur:  # sketches and First Fit: within the bound theory gives
        validation.write_tolerances(cur, defs)  # what validation does first; this test must not rely on order
        cur.execute(
            """SELECT metric, avg((error <= tolerance)::int), max(error) FROM quality.comparison
                       WHERE day = %s GROUP BY metric""",
            (DAY,),
        )
        share_within = {m: (float(s), e) for m, s, e in cur.fetchall()}
    for m in defs.metrics:
        assert share_within[m.name][0] >= m.mostly, (m.name, share_within[m.name])


def test_gx_checkpoint_passes_then_fails_on_one_altered_stream_value(streamed_day, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, _, _ = streamed_day
    spark.submit(settings, DAY, "test-gx")
    good = validation.validate_day(settings, defs, DAY, "test-gx-good")
    assert good.success, good.summary_line()
    assert all(m.missing == 0 for m in good.metrics)
    assert all(m.max_error == 0 for m in good.metrics if m.kind in ("count", "sum", "mean", "min", "max"))
    assert good.docs_index.exists()
    with storage.transaction(pg_url) as cur:
        cur.execute(
            """UPDATE stream.results SET value = value * 1.5 WHERE ctid = (
                         SELECT ctid FROM stream.results WHERE day = %s AND metric = 'cpu_seconds' LIMIT 1)""",
            (DAY,),
        )
    try:
        bad = validation.validate_day(settings, defs, DAY, "test-gx-bad")
        assert not bad.success
        by_metric = {m.metric: m for m in bad.metrics}
        assert by_metric["cpu_seconds"].over_tolerance == 1 and not by_metric["cpu_seconds"].success
        assert by_metric["jobs"].success
    finally:
        with storage.transaction(pg_url) as cur:
            cur.execute(
                """UPDATE stream.results s SET value = t.value FROM truth.results t
                           WHERE s.metric = t.metric AND s.group_key = t.group_key
                             AND s.window_start = t.window_start AND s.day = %s""",
                (DAY,),
            )


def test_nightly_dags_run_end_to_end(streamed_day, airflow_db: Path, pg_url: str) -> None:  # noqa: ANN001
    """nightly_recompute writes the day's truth and publishes the truth Asset naming the day; validate_accuracy
    for that day records every metric's accuracy. (The Asset triggering the validation is tested against a
    running scheduler in test_stack.py; dag.test() runs one DAG.)"""
    from airflow.dag_processing.dagbag import DagBag

    settings, _, _, _ = streamed_day
    with storage.transaction(pg_url) as cur:
        cur.execute("DELETE FROM truth.results WHERE day = %s", (DAY,))
    bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    run = bag.get_dag("nightly_recompute").test(run_conf={"date": DAY.isoformat()})
    assert str(run.state) in ("success", "DagRunState.SUCCESS")
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert set(states) == {"wait_for_lake_day", "spark_recompute"}
    assert all(s in ("success", "TaskInstanceState.SUCCESS") for s in states.values()), states
    assert len(storage.fetch_results(pg_url, "truth", DAY)) > 0

    run = bag.get_dag("validate_accuracy").test(run_conf={"date": DAY.isoformat()})
    assert str(run.state) in ("success", "DagRunState.SUCCESS")
    tis = run.get_task_instances()
    assert sorted((ti.task_id, ti.map_index) for ti in tis) == [
        ("alert_on_drift", 0),
        ("check_accuracy", 0),
        ("days_to_validate", -1),
        ("validate_with_gx", 0),
    ]
    with storage.transaction(pg_url) as cur:  # a day the stream got right raises nothing (it may recover
        # checks that an earlier day of this database left failing)
        cur.execute("SELECT count(*) FROM quality.alerts WHERE day = %s AND state_after <> 'ok'", (DAY,))
        assert cur.fetchone() == (0,)
    with storage.transaction(pg_url) as cur:
        cur.execute(
            "SELECT bool_and(success), count(*) FROM quality.accuracy_history WHERE run_id = %s AND day = %s",
            (re.sub(r"[^A-Za-z0-9_.:+-]", "_", run.run_id)[:200], DAY),  # as orchestration.context_run_id
        )
        ok, n = cur.fetchone()
    assert ok and n == len(load_definitions(settings.definitions_path).metrics)


SKETCH_DAY = date(2026, 11, 23)
SKETCH_METRICS = """
[[metric]]
name = "users_hll"
kind = "distinct"
field = "user"
lg_k = 4
group_by = ["tenant"]
window = "1h"
allowed_lateness = "30s"

[[metric]]
name = "duration_p90"
kind = "quantile"
value = "duration_s"
q = 0.9
k = 8
group_by = ["tenant"]
window = "1h"
allowed_lateness = "30s"
"""


@pytest.fixture(scope="module")
def sketch_day(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    """One tenant, 60,000 events: every hourly window holds ~2,500 values, far more than 10x the sketches' k
    (HLL with 16 registers, KLL with k = 8), so the stream's sketches really approximate."""
    from batchmark.config import REPO_ROOT

    text = (REPO_ROOT / "batchmark" / "metrics.toml").read_text()
    path = home / "sketch-metrics.toml"
    path.write_text(text[: text.index("[[metric]]")] + SKETCH_METRICS)
    saved = os.environ.get("BATCHMARK_DEFINITIONS")
    os.environ["BATCHMARK_DEFINITIONS"] = str(path)
    try:
        with _streamed_day("events-sketch", SKETCH_DAY, home, events=60_000, tenants=1, seed=5) as streamed:
            settings = streamed[0]
            yield settings, streamed[1], spark.submit(settings, SKETCH_DAY, "sketch-day")
    finally:
        if saved is None:
            os.environ.pop("BATCHMARK_DEFINITIONS", None)
        else:
            os.environ["BATCHMARK_DEFINITIONS"] = saved


def test_sketches_on_windows_of_thousands_of_values_err_within_their_bounds(sketch_day, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, result = sketch_day
    assert result["truth_events"] == 60_000
    with storage.transaction(pg_url) as cur:
        validation.write_tolerances(cur, defs)
        cur.execute(
            """SELECT metric, count(*), min(batch_events), count(*) FILTER (WHERE error > 0),
                      avg((error <= tolerance)::int), max(error)
               FROM quality.comparison WHERE day = %s AND metric = ANY(%s) GROUP BY metric""",
            (SKETCH_DAY, [m.name for m in defs.metrics]),
        )
        figures = {r[0]: r[1:] for r in cur.fetchall()}
    for m in defs.metrics:
        k = 2**m.aggregate.lg_k if m.kind == "distinct" else m.aggregate.params["k"]
        windows, smallest, with_error, within, worst = figures[m.name]
        print(
            f"{m.name}: {windows} windows of >= {smallest} values (k {k}); {with_error} with a non-zero error; "
            f"{float(within):.0%} within the bound {m.tolerance:.3g}; worst {worst:.3g}"
        )
        assert windows == 24 and smallest >= 10 * k, m.name
        assert with_error >= 12, m.name  # the sketch approximates: most windows are not exact
        assert float(within) >= m.mostly and worst > 0, m.name
