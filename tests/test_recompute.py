"""The Spark job itself (batch/recompute.py) on lake days landed directly, without a stream.

The stream == truth tests (tests/integration) check the job against the Faust worker; these check what only
the job does: validation as Spark expressions, the truth against the archive computed independently, the
attribution against what the generator did, and the swap of a day through the staging table.
"""

from __future__ import annotations

import math
from datetime import date

import pandas as pd
import pytest

from batch.recompute import rejection_column
from batchmark import config, spark, storage
from batchmark.config import REPO_ROOT, SparkSettings, parse_spark_conf
from batchmark.definitions import load_definitions
from batchmark.errors import ConfigError
from batchmark.events import Rejection, validate_record
from batchmark.generator import GeneratorConfig, write_lake_day

DAY = date(2026, 9, 14)
DEFS = load_definitions(REPO_ROOT / "batchmark" / "metrics.toml")


@pytest.fixture(scope="module")
def session():  # noqa: ANN201
    from pyspark.sql import SparkSession

    s = (
        SparkSession.builder.master("local[1]")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    yield s
    s.stop()


def _rows() -> list[dict]:
    ok = {
        "event_id": "e",
        "event_time_ms": 1_790_000_000_000,
        "tenant": "t",
        "user": "u",
        "job_id": "j",
        "cpu": 1.0,
        "mem_gb": 2.0,
        "duration_s": 3.0,
    }
    variants = [
        {},
        {"event_id": None},
        {"event_id": ""},
        {"event_id": "x" * 128},
        {"event_id": "x" * 129},
        {"event_id": "é" * 128},
        {"event_time_ms": None},
        {"event_time_ms": 0},
        {"event_time_ms": 4_200_000_000_000},
        {"tenant": None},
        {"tenant": ""},
        {"tenant": "é" * 64},  # 128 bytes, 64 characters: the limit counts characters
        {"tenant": "é" * 65},
        {"tenant": "t" * 65},
        {"cpu": float("nan")},
        {"cpu": float("inf")},
        {"cpu": -0.5},
        {"cpu": 1024.0},
        {"cpu": 1024.5},
        {"mem_gb": None, "cpu": float("nan")},  # the first failing field decides
        {"duration_s": -1.0, "tenant": ""},
        {"duration_s": float("-inf")},
    ]
    return [{**ok, "event_id": f"e{i}", **v} for i, v in enumerate(variants)]


def test_rejection_column_agrees_with_validate_record(session) -> None:  # noqa: ANN001
    ds = DEFS.dataset
    rows = _rows()
    schema = "event_id string, event_time_ms bigint, tenant string, user string, job_id string, cpu double, " \
             "mem_gb double, duration_s double"  # fmt: skip
    cols = ["event_id", "event_time_ms", *ds.field_names]
    df = session.createDataFrame([tuple(r[c] for c in cols) for r in rows], schema)  # tuples: NaN stays NaN
    got = [r[0] for r in df.select(rejection_column(ds)).collect()]
    want = []
    for r in rows:
        obj = {ds.event_id: r["event_id"], ds.event_time: r["event_time_ms"], **{n: r[n] for n in ds.field_names}}
        result = validate_record(obj, ds)
        want.append(result.reason if isinstance(result, Rejection) else "")
    assert want.count("") == 5 and len(set(want)) == 5  # valid rows and every typed-row reason are covered
    assert got == want


def test_rejection_column_lets_nulls_through_nullable_fields_only(session) -> None:  # noqa: ANN001
    from dataclasses import replace

    ds = DEFS.dataset
    nullable = {"user", "cpu"}
    ds = replace(ds, fields=tuple(replace(f, nullable=f.name in nullable) for f in ds.fields))
    cols = ["event_id", "event_time_ms", *ds.field_names]
    ok = dict(_rows()[0])
    rows = [{**ok, "event_id": f"n{i}", **v} for i, v in enumerate(
        [{"user": None}, {"cpu": None}, {"user": None, "cpu": None}, {"mem_gb": None}, {"cpu": -1.0}, {"user": ""}]
    )]  # fmt: skip
    schema = "event_id string, event_time_ms bigint, tenant string, user string, job_id string, cpu double, " \
             "mem_gb double, duration_s double"  # fmt: skip
    df = session.createDataFrame([tuple(r[c] for c in cols) for r in rows], schema)
    got = [r[0] for r in df.select(rejection_column(ds)).collect()]
    want = []
    for r in rows:
        fields = {n: r[n] for n in ds.field_names}
        result = validate_record({ds.event_id: r["event_id"], ds.event_time: r["event_time_ms"], **fields}, ds)
        want.append(result.reason if isinstance(result, Rejection) else "")
    assert want == ["", "", "", "missing_field", "out_of_range", "out_of_range"]
    assert got == want


def test_spark_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHMARK_SPARK_SHUFFLE_PARTITIONS", "3")
    monkeypatch.setenv("BATCHMARK_SPARK_EXECUTOR_MEMORY", "3g")
    monkeypatch.setenv("BATCHMARK_SPARK_PYTHON", "/opt/cluster/python3")
    monkeypatch.setenv("BATCHMARK_SPARK_CONF", "spark.executor.instances=2, spark.sql.shuffle.partitions=5")
    settings = config.load()
    cmd = spark.command(settings, DAY, "r1")
    confs = {cmd[i + 1].split("=", 1)[0]: cmd[i + 1].split("=", 1)[1] for i, a in enumerate(cmd) if a == "--conf"}
    assert confs["spark.sql.shuffle.partitions"] == "5"  # the free-form conf has the last word
    assert confs["spark.executor.memory"] == "3g" and confs["spark.executor.instances"] == "2"
    assert confs["spark.pyspark.python"] == "/opt/cluster/python3"
    assert spark.environment(settings)["PYSPARK_PYTHON"] == "/opt/cluster/python3"
    assert "spark.driver.memory" not in confs  # unset: Spark's own default
    assert SparkSettings().spark_conf()["spark.sql.shuffle.partitions"] == "8"
    with pytest.raises(ConfigError, match="spark.<key>=<value>"):
        parse_spark_conf("executor.memory=2g")
    monkeypatch.setenv("BATCHMARK_SPARK_SHUFFLE_PARTITIONS", "zero")
    with pytest.raises(ConfigError, match="whole number"):
        config.load()


@pytest.mark.timeout(900)
def test_generated_day_truth_equals_the_archive_and_attribution_the_generator(pg_url: str) -> None:
    settings = config.load()
    cfg = GeneratorConfig(day=DAY, events=30_000, duplicates=0.02, late=0.01, lost=0.02, seed=11)
    counts = write_lake_day(cfg, settings.events_lake, settings.archive_file(DAY), chunk_events=7_000)
    result = spark.submit(settings, DAY, "gen-day")
    assert result["truth_events"] == counts["events"] == 30_000  # every archived event once, lost ones too
    assert result["lake_records"] == result["lake_records_read"] == counts["lake_records"]
    assert result["rows"] == result["rows_written"] > 0

    events = pd.read_json(settings.archive_file(DAY), lines=True, convert_dates=False, dtype={"event_time": str})
    ts = pd.to_datetime(events["event_time"], utc=True, format="ISO8601").astype("int64") // 1_000_000
    events["window"] = ts - ts % 60_000
    events["value"] = events["cpu"] * events["duration_s"]
    want = {}
    for (tenant, start), g in events.groupby(["tenant", "window"]):
        want[("jobs", tenant, start)] = (float(len(g)), len(g))
        want[("cpu_seconds", tenant, start)] = (math.fsum(g["value"].tolist()), len(g))
    truth = storage.fetch_results(pg_url, "truth", DAY)
    got = {
        (m, g, int(s.timestamp() * 1000)): (v, n) for (m, g, s), (v, n) in truth.items() if m in ("jobs", "cpu_seconds")
    }
    assert got == want  # bit for bit: the exact sum is math.fsum

    with storage.transaction(pg_url) as cur:
        cur.execute(
            "SELECT sum(n_lost), sum(n_dup), sum(n_late) FROM quality.window_accuracy"
            " WHERE day = %s AND metric = 'jobs'",
            (DAY,),
        )
        lost, dup, late = cur.fetchone()
        cur.execute("SELECT count(*) FROM truth.staging")
        assert cur.fetchone()[0] == 0  # the run's staged rows are gone once swapped in
    assert (lost, dup, late) == (counts["lost"], counts["duplicates"], counts["late"])


def test_swap_replaces_a_day_from_one_run_and_leaves_other_runs_staged(pg_url: str) -> None:
    day = date(2026, 9, 15)
    start = int(pd.Timestamp(day, tz="UTC").timestamp() * 1000)

    def stage(run: str, value: float) -> None:
        row = [run, "jobs", "t1", start, start + 60_000, value, 1, None, None, None, 0, 0, 0, 0, 0, 0, None, None]
        text = ",".join("\\N" if v is None else str(v) for v in row) + "\n"
        import io

        storage.copy_to_staging(pg_url, io.StringIO(text))

    stage("run-a", 1.0)
    assert storage.swap_truth_day(pg_url, day, ["jobs"], "run-a") == 1
    stage("run-b", 2.0)
    stage("run-c", 3.0)
    assert storage.swap_truth_day(pg_url, day, ["jobs"], "run-b") == 1
    truth = storage.fetch_results(pg_url, "truth", day)
    assert [v for v, _ in truth.values()] == [2.0]  # run-a's day replaced by run-b's, not added to
    with storage.transaction(pg_url) as cur:
        cur.execute("SELECT run_id, value FROM truth.staging")
        assert cur.fetchall() == [("run-c", 3.0)]
    storage.clear_staging(pg_url, "run-c")
    with storage.transaction(pg_url) as cur:
        cur.execute("SELECT count(*) FROM truth.staging")
        assert cur.fetchone()[0] == 0


@pytest.mark.timeout(600)
def test_lake_records_a_stricter_definition_refuses_are_counted_by_reason(
    pg_url: str,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    day = date(2026, 9, 16)
    strict = tmp_path / "strict.toml"
    strict.write_text(
        (REPO_ROOT / "batchmark" / "metrics.toml")
        .read_text()
        .replace('cpu = { type = "float", min = 0.0, max = 1024.0 }', 'cpu = { type = "float", min = 0.0, max = 8.0 }')
    )
    settings = config.load()
    write_lake_day(GeneratorConfig(day=day, events=5_000, duplicates=0.05, seed=3), settings.events_lake)
    lake = pq.read_table(settings.events_lake / f"date={day}")
    too_big = int(pc.sum(pc.greater(lake["cpu"], 8.0)).as_py())
    start = pd.Timestamp(day, tz="UTC")
    with storage.transaction(pg_url) as cur:  # the stream's row of a metric since removed from the definitions
        cur.execute(
            "INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events)"
            " VALUES ('retired_metric', 'tenant-00', %s, %s, %s, 1.0, 1)",
            (start, start + pd.Timedelta(minutes=1), day),
        )
    monkeypatch.setenv("BATCHMARK_DEFINITIONS", str(strict))
    result = spark.submit(config.load(), day, "strict")  # the retired metric's row is left out, not a crash
    assert too_big > 100 and result["rejected"] == {"out_of_range": too_big}
    assert result["truth_events"] == len(set(lake.filter(pc.less_equal(lake["cpu"], 8.0))["event_id"].to_pylist()))
    with storage.transaction(pg_url) as cur:  # kept for the rejected_rise alert, with the day's truth
        cur.execute("SELECT source, reason, records FROM quality.rejections WHERE day = %s", (day,))
        assert cur.fetchall() == [("lake", "out_of_range", too_big)]
        cur.execute("SELECT count(*) FROM truth.results WHERE day = %s AND metric = 'retired_metric'", (day,))
        assert cur.fetchone()[0] == 0
