"""Real files through the documented path: `la-riots.csv` from the PyPI package vega_datasets, and a generated CSV
with nulls of every type in local time across a DST change.

La-riots as it is (no id column, a null age, columns no metric reads, dates in Los Angeles time) with the
definitions file examples/la_riots/metrics.toml: replayed into its own topic, streamed by the Faust worker,
recomputed by Spark for a Los Angeles day and validated with GX. The exact kinds must equal the truth, the
sketches stay within their bounds, a metric with no window that day (no unknown age) is still judged, and a
day inside the range with no deaths is certified empty. The generated CSV adds three refused rows: counted per
reason in the quality table, and the exact kinds still equal the truth on New York's 23-hour day.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import vega_datasets

from batchmark import spark, storage, validation
from batchmark.config import REPO_ROOT
from tests.integration.conftest import replayed_file

DAY = date(1992, 4, 30)  # 28 deaths: the busiest day
EMPTY = date(1992, 5, 10)  # between the last deaths of the first week and the next one
CSV = Path(vega_datasets.__file__).parent / "_data" / "la-riots.csv"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def riots(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    definitions = REPO_ROOT / "examples" / "la_riots" / "metrics.toml"
    with replayed_file(CSV, home, "la-riots", definitions, EMPTY) as replayed:  # dead letters: la-riots.dlq
        yield replayed


def test_the_real_file_replays_streams_recomputes_and_validates_exactly(riots, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, stats = riots
    assert stats.records == 63 and not stats.rejected  # every row becomes a valid record
    assert settings.dlq_topic == "la-riots.dlq"
    result = spark.submit(settings, DAY, "la-riots-day")
    frame = pd.read_csv(CSV)
    assert result["truth_events"] == (frame.death_date == DAY.isoformat()).sum() == 28
    report = validation.validate_day(settings, defs, DAY, run_id="la-riots-validate")
    print("\nla-riots", report.summary_line())
    by = {m.metric: m for m in report.metrics}
    assert report.success, report.summary_line()
    assert by["deaths"].windows == frame[frame.death_date == DAY.isoformat()].type.nunique()
    assert by["age_unknown"].windows == 0  # no unknown age that day: recomputed, nothing to compare
    assert by["age_mean"].truth_events == 28  # every age known that day
    with storage.transaction(pg_url) as cur:
        cur.execute(
            """SELECT metric, group_key, batch_value, stream_value, error FROM quality.comparison
               WHERE day = %s ORDER BY metric, group_key""",
            (DAY,),
        )
        rows = cur.fetchall()
    exact = {"deaths", "age_mean", "age_max"}
    assert {r[0] for r in rows} == {"deaths", "age_mean", "age_max", "age_median", "neighborhoods"}
    for metric, key, truth, stream, error in rows:
        if metric in exact:
            assert stream == truth and error == 0, (metric, key)
        else:
            assert error <= defs.metric(metric).tolerance, (metric, key, error)
    # the mean age of the day's homicides, from the file itself
    ages = frame[(frame.death_date == DAY.isoformat()) & (frame.type == "Homicide")].age.dropna()
    assert dict((r[1], r[2]) for r in rows if r[0] == "age_mean")["Homicide"] == sum(ages) / len(ages)
    # the GX project and its Data Docs are the dataset's own, under the runtime home
    assert report.docs_index.is_relative_to(settings.gx_project("la_riots"))


def test_a_day_without_events_is_certified_empty(riots) -> None:  # noqa: ANN001
    settings, defs, _ = riots
    result = spark.submit(settings, EMPTY, "la-riots-empty")
    assert result["empty"] is True and result["truth_events"] == 0 and result["rows"] == 0
    report = validation.validate_day(settings, defs, EMPTY, run_id="la-riots-empty-validate")
    assert report.success and all(m.windows == 0 for m in report.metrics)
    later = date(2030, 1, 1)  # the stream has not passed it: refused, not certified
    with pytest.raises(Exception, match="cannot be certified empty"):
        spark.submit(settings, later, "la-riots-future")


@pytest.fixture(scope="module")
def nulls_day(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    """A generated CSV with nulls in every field type, NA tokens, an extra column, no id column and local date
    and clock columns across New York's spring DST change, plus three rows the definitions refuse; the dataset's
    days are New York days."""
    from tests.test_custom_dataset import NULLS_DEFS, _nulls_csv

    defs_file = home / "nulls-defs.toml"
    defs_file.write_text(
        NULLS_DEFS.replace('partition_key = "key"', 'partition_key = "key"\ntimezone = "America/New_York"')
    )
    data = home / "nulls.csv"
    rows = _nulls_csv(data)
    with data.open("a") as fh:  # refused: a null key (not nullable), a float that is text, an int with a fraction
        fh.write(",2026-03-08,04:00:01,x,1,1,bad 1\n")
        fh.write("a,2026-03-08,04:00:02,x,abc,1,bad 2\n")
        fh.write("b,2026-03-08,04:00:03,x,1,1.5,bad 3\n")
    with replayed_file(data, home, "nulls", defs_file, date(2026, 3, 8)) as (settings, defs, stats):
        yield settings, defs, stats, rows


def test_nulls_and_local_days_through_the_stream_and_spark(nulls_day, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, stats, rows = nulls_day
    spring = date(2026, 3, 8)  # a 23-hour day in New York
    assert dict(stats.rejected) == {"missing_field": 1, "wrong_type": 2}
    with storage.transaction(pg_url) as cur:  # the worker counted the same, per day and reason
        cur.execute("SELECT day, reason, sum(records) FROM stream.rejections WHERE topic = 'nulls' GROUP BY 1, 2")
        assert sorted(cur.fetchall()) == [(spring, "missing_field", 1), (spring, "wrong_type", 2)]
    result = spark.submit(settings, spring, "nulls-spring")
    calendar = defs.dataset.calendar
    in_day = [r for r in rows if calendar.day_of(r["at"]) == spring]
    assert result["truth_events"] == len(in_day)
    report = validation.validate_day(settings, defs, spring, run_id="nulls-spring-validate")
    assert report.success, report.summary_line()
    assert report.summary_line().endswith("; 3 records rejected (stream: wrong_type 2, missing_field 1)")
    by = {m.metric: m for m in report.metrics}
    assert by["i_mean"].truth_events == sum(r["i"] is not None for r in in_day)  # nulls skipped by the batch too
    with storage.transaction(pg_url) as cur:
        cur.execute(
            """SELECT metric, count(*), count(*) FILTER (WHERE stream_value IS DISTINCT FROM batch_value),
                      max(error), min(window_start), max(window_start)
               FROM quality.comparison WHERE day = %s GROUP BY metric""",
            (spring,),
        )
        figures = {r[0]: r[1:] for r in cur.fetchall()}
        cur.execute("SELECT value FROM truth.results WHERE day = %s AND metric = 'rows_without_f'", (spring,))
        assert sum(v for (v,) in cur.fetchall()) == sum(r["f"] is None for r in in_day)
    for name in ("rows", "rows_without_f", "f_sum", "i_mean", "f_min", "i_max"):
        windows, differ, worst, *_ = figures[name]
        assert windows > 0 and differ == 0 and worst == 0, name  # exact kinds: equal, window by window
    for name in ("s_distinct", "i_top", "f_p90"):
        assert figures[name][2] <= defs.metric(name).tolerance, name
    start, _ = calendar.day_bounds_ms(spring)
    first = min(f[3] for f in figures.values())
    assert int(first.timestamp() * 1000) == start  # the day's first window starts at New York's midnight
