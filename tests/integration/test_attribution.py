"""Error attribution: a day built with known numbers of late, duplicated and lost events, attributed exactly.

The stream drops late records, counts duplicate copies and never sees lost events (they exist only in the
archive, the system of record). The batch must say, per window, how much of the stream's difference comes
from each, and that the exact kinds' sketch term is zero.
"""

from __future__ import annotations

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
