"""A real public dataset through the documented path: `la-riots.csv` from the PyPI package vega_datasets.

The file as it is (no id column, a null age, columns no metric reads, dates in Los Angeles time) with the
definitions file examples/la_riots/metrics.toml: replayed into its own topic, streamed by the Faust worker,
recomputed by Spark for a Los Angeles day and validated with GX. The exact kinds must equal the truth, the
sketches stay within their bounds, a metric with no window that day (no unknown age) is still judged, and a
day inside the range with no deaths is certified empty.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import vega_datasets

from batchmark import config, spark, storage, validation
from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from batchmark.demo import wait_for_day
from batchmark.replay import replay
from tests.integration.conftest import running_worker

DAY = date(1992, 4, 30)  # 28 deaths: the busiest day
EMPTY = date(1992, 5, 10)  # between the last deaths of the first week and the next one
CSV = Path(vega_datasets.__file__).parent / "_data" / "la-riots.csv"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def riots(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    saved = {k: os.environ.get(k) for k in ("BATCHMARK_DEFINITIONS", "BATCHMARK_EVENTS_TOPIC", "BATCHMARK_DLQ_TOPIC")}
    os.environ["BATCHMARK_DEFINITIONS"] = str(REPO_ROOT / "examples" / "la_riots" / "metrics.toml")
    os.environ["BATCHMARK_EVENTS_TOPIC"] = "la-riots"
    os.environ.pop("BATCHMARK_DLQ_TOPIC", None)  # the default: la-riots.dlq
    try:
        settings = config.load()
        defs = load_definitions(settings.definitions_path)
        with running_worker(settings, home, "la-riots") as (worker, log):
            stats = replay(CSV, settings.bootstrap_servers, settings.events_topic, defs, progress=False)
            lateness = max(m.allowed_lateness_ms for m in defs.metrics)
            wait_for_day(settings, EMPTY, lateness, worker, log, timeout_s=240)
        yield settings, defs, stats
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_real_file_replays_streams_recomputes_and_validates_exactly(riots, pg_url: str) -> None:  # noqa: ANN001
    settings, defs, stats = riots
    assert stats.records == 63 and not stats.rejected  # every row becomes a valid record
    assert settings.dlq_topic == "la-riots.dlq"
    result = spark.submit(settings, DAY, "la-riots-day")
    frame = pd.read_csv(CSV)
    assert result["truth_events"] == (frame.death_date == DAY.isoformat()).sum() == 28
    report = validation.validate_day(settings, defs, DAY, run_id="la-riots-validate")
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
