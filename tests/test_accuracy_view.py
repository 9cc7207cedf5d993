"""The Accuracy view as `batchmark report` writes it, read back in Chromium with every outside request blocked:
each chart must have drawn the database's figures (read from its rendered marks), and the tables must say what
the tables in Postgres say."""

from __future__ import annotations

import re
from datetime import date, timedelta
from pathlib import Path

import pytest

from batchmark import alerts, config, reports, storage, validation
from batchmark.cli import main
from batchmark.definitions import load_definitions
from batchmark.engine import WindowResult
from batchmark.windows import day_bounds_ms
from tests.browser import CHROMIUM, block_outside

START = date(2026, 8, 1)
DAYS = 10
LAST = START + timedelta(days=DAYS - 1)
ARTIFACTS = config.REPO_ROOT / ".batchmark" / "test-artifacts" / "accuracy-view"


def _errors(metric: str, i: int) -> tuple[float, float]:
    """(mean, max) error of a metric on day i: jobs breaks on the last day, the others stay exact."""
    if metric == "jobs" and i == DAYS - 1:
        return 0.02, 0.125
    if metric == "node_packing":
        return 1.05 + 0.01 * i, 1.2
    return 0.0, 0.0


@pytest.fixture(scope="module")
def history(pg_url: str) -> dict:
    """Ten validated days of jobs, node_packing and cpu_seconds; the last day with planted lost and late events,
    its truth and stream rows, and the alerts the days raised."""
    defs = load_definitions(config.REPO_ROOT / "batchmark" / "metrics.toml")
    kinds = {m.name: m for m in defs.metrics}
    figures = {}
    with storage.transaction(pg_url) as cur:
        cur.execute("TRUNCATE quality.alerts, quality.accuracy_history, quality.rejections CASCADE")
        validation.write_tolerances(cur, defs)  # what a validation writes first: the view's kinds and tolerances
        for i in range(DAYS):
            day = START + timedelta(days=i)
            for name in ("jobs", "node_packing", "cpu_seconds"):
                mean, worst = _errors(name, i)
                late, lost = (40 + i, 0) if i < DAYS - 1 else (900, 300)
                broken = name == "jobs" and i == DAYS - 1
                figures[(name, day)] = (mean, worst, late, lost)
                cur.execute(
                    """INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing,
                           over_tolerance, max_error, mean_error, tolerance, kind, late_events, duplicate_events,
                           lost_events, incomplete, impossible, within_tolerance, truth_events, sketch_effect,
                           report_page)
                       VALUES (%s, %s, %s, %s, 1440, 0, %s, %s, %s, %s, %s, %s, 7, %s, %s, 0, %s, 50000, 0, %s)""",
                    (f"view-{i}", day, name, not broken, 30 if broken else 0, worst, mean, kinds[name].tolerance,
                     kinds[name].kind, late, lost, 40 if broken else 0, not broken,
                     f"validations/accuracy_{name}/view-{i}/page.html"),
                )  # fmt: skip
            cur.execute("INSERT INTO quality.rejections (day, source, reason, records) VALUES (%s, 'archive', "
                        "'not_json', %s) ON CONFLICT DO NOTHING", (day, 3 + i))  # fmt: skip
    start, _ = day_bounds_ms(LAST)
    truth = [("jobs", "acme", start + k * 60_000, start + (k + 1) * 60_000, 100.0, 100, None) for k in range(3)]
    truth += [("node_packing", "acme", start, start + 300_000, 40.0, 500, {"lower_bound": 38})]
    storage.replace_truth_day(pg_url, LAST, ["jobs", "node_packing"], truth, "view-truth")
    with storage.transaction(pg_url) as cur:
        storage.upsert_stream_results(
            cur,
            [
                WindowResult("jobs", "acme", start, start + 60_000, 87.5, 88),  # 12.5% low: 12 lost, 1 late
                WindowResult("jobs", "acme", start + 60_000, start + 120_000, 100.0, 100),
                WindowResult("node_packing", "acme", start, start + 300_000, 48.0, 500),  # FF/FFD 1.2
            ],
        )  # the third jobs window has no stream row: missing
        cur.execute(
            """INSERT INTO quality.window_accuracy (metric, group_key, window_start, day, stream_value, error,
                   n_lost, n_dup, n_late) VALUES ('jobs', 'acme', to_timestamp(%s / 1000.0), %s, 87.5, 0.125, 12, 0, 1)
               ON CONFLICT (metric, group_key, window_start) DO UPDATE SET n_lost = 12, n_late = 1""",
            (start, LAST),
        )
    settings = config.load()
    for i in range(DAYS):
        alerts.evaluate_day(settings, defs, START + timedelta(days=i))
    return figures


def _report(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "report.html"
    assert main(["report", "--date", LAST.isoformat(), "-o", str(out), *args]) == 0
    return out


def test_the_report_is_one_file_that_needs_no_network(history, tmp_path) -> None:  # noqa: ANN001
    out = _report(tmp_path)
    text = out.read_text()
    assert reports.external_resources(text) == []
    assert "<script src=" not in text and "<link" not in text  # styles and scripts are inside the file


def test_the_report_in_a_browser_draws_the_databases_figures(history, tmp_path) -> None:  # noqa: ANN001
    from playwright.sync_api import sync_playwright

    out = _report(tmp_path)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        block_outside(page, ("file://", "data:"), outside)
        page.goto(out.as_uri())
        page.evaluate("window.bmReady")
        charts = page.evaluate("Object.keys(window.bmCharts).sort()")

        def labels(chart: str) -> list[str]:
            return page.evaluate(
                "id => Array.from(document.querySelectorAll('#chart-' + id + ' [aria-roledescription]'))"
                ".filter(e => /^(point|bar|rect|symbol)$/.test(e.getAttribute('aria-roledescription')))"
                ".map(e => e.getAttribute('aria-label'))",
                chart,
            )

        error_points = labels("error-jobs")
        cause_bars = labels("causes-jobs")
        packing_points = labels("binpack-node_packing")
        overview = {
            r[0]: r
            for r in page.evaluate(
                "Array.from(document.querySelectorAll('#overview tbody tr'))"
                ".map(tr => Array.from(tr.children).map(td => td.innerText))"
            )
        }
        worst = page.evaluate(
            "Array.from(document.querySelectorAll('#worst tbody tr')).map(tr => Array.from(tr.children)"
            ".map(td => td.innerText))"
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert outside == [], outside

    for name in ("jobs", "node_packing", "cpu_seconds"):
        assert {f"error-{name}", f"causes-{name}"} <= set(charts)
    # every day's mean and max error of jobs, as drawn
    drawn = {}
    for label in error_points:
        fields = dict(part.split(": ", 1) for part in label.split("; "))
        drawn[(fields["day"], fields["figure"])] = float(fields["error"])
    for i in range(DAYS):
        day = START + timedelta(days=i)
        mean, worst_error, _, _ = history[("jobs", day)]
        assert drawn[(day.isoformat(), "mean error")] == pytest.approx(mean, abs=5e-4)
        assert drawn[(day.isoformat(), "max error")] == pytest.approx(worst_error, abs=5e-4)
    # the cause split per day: late, lost and rejected as stored
    bars = {}
    for label in cause_bars:
        fields = dict(part.split(": ", 1) for part in label.split("; "))
        bars[(fields["day"], fields["cause"])] = int(fields["events"])
    assert bars[(LAST.isoformat(), "lost")] == 300 and bars[(LAST.isoformat(), "late")] == 900
    assert bars[(START.isoformat(), "late")] == 40 and bars[(START.isoformat(), "rejected")] == 3
    assert bars[(LAST.isoformat(), "duplicated")] == 7
    # bin packing: the last day's worst FF/FFD (48 / 40) and FF / lower bound (48 / 38)
    ratios = {
        dict(p.split(": ", 1) for p in lb.split("; "))["ratio"]: lb for lb in packing_points if LAST.isoformat() in lb
    }
    assert "value: 1.200" in ratios["FF/FFD (worst window)"] and "value: 1.263" in ratios["FF/lower bound (worst)"]

    jobs = overview["jobs"]
    assert "FAIL" in jobs[1] and jobs[2] == "0.125 / 0" and jobs[5] == "30" and jobs[6] == "40"
    assert "900 late, 300 lost, 7 duplicated events" in jobs[7] and "12 rejected" in jobs[7]
    assert "tolerance (error)" in jobs[8] and "completeness (error)" in jobs[8]
    assert jobs[9].startswith("keep the nightly batch")
    assert "PASS" in overview["cpu_seconds"][1]
    assert overview["cpu_seconds"][9].startswith("keep the nightly batch")  # 10 days < the 14 the decision needs
    assert "only 10 days of history, 14 needed" in overview["cpu_seconds"][9]
    assert worst[0][:2] == ["jobs", "acme"] and worst[0][6] == "missing from the stream"
    assert worst[1][5] == "0.125" and worst[1][6] == "12 lost events", worst  # over its tolerance of 0


def test_a_metric_within_its_bound_for_the_window_is_enough_on_its_own(history, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BATCHMARK_DECISION_DAYS", "5")
    text = _report(tmp_path).read_text()
    row = re.search(r'<tr data-metric="cpu_seconds">.*?</tr>', text).group(0)
    assert "stream alone is enough" in row and "5 of the last 5 validated days within the bound 0 and complete" in row
    row = re.search(r'<tr data-metric="jobs">.*?</tr>', text).group(0)
    assert "keep the nightly batch" in row and "4 of the last 5" in row
    assert f"worst day {LAST.isoformat()} (relative error 0.125)" in row  # the evidence names the worst day
    row = re.search(r'<tr data-metric="node_packing">.*?</tr>', text).group(0)  # FF/FFD 1.2, within 1.7
    assert "stream alone is enough" in row and "within the bound 1.7 and complete" in row and "(FF / FFD 1.2)" in row


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--date", "2026-02-30"], "2026-02-30"),
        (["--days", "0"], "--days must be between 1 and 400"),
        (["--date", "2026-07-01"], "2026-07-01 was not validated"),
    ],
)
def test_bad_report_arguments_are_refused_with_what_to_fix(history, tmp_path, capsys, args, message) -> None:  # noqa: ANN001
    assert main(["report", "-o", str(tmp_path / "x.html"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_the_newest_version_comparison_is_a_table_in_the_report(history, tmp_path, pg_url: str) -> None:  # noqa: ANN001
    import psycopg2.extras

    with storage.transaction(pg_url) as cur:
        cur.execute(
            """INSERT INTO quality.version_runs (run_id, source, stable, candidate, topic, status, verdict, events,
                   started_at, finished_at)
               VALUES ('view-kappa', 'the file day.jsonl', 'stable', 'small-sketches', 't', 'done',
                       'candidate ''small-sketches'' against ''stable'': worse on distinct_users (sketch error)',
                       4000, now(), now())"""
        )
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO quality.version_comparison (run_id, metric, kind, windows, stable_max_error,
                   stable_mean_error, candidate_max_error, candidate_mean_error, worse_windows, better_windows,
                   same_windows, p_value, verdict, cause, figures) VALUES %s""",
            [
                (
                    "view-kappa",
                    "distinct_users",
                    "distinct",
                    192,
                    0.01,
                    0.002,
                    0.08,
                    0.03,
                    150,
                    10,
                    32,
                    1e-30,
                    "worse",
                    "sketch error",
                    "{}",
                ),
                ("view-kappa", "jobs", "count", 7000, 0.0, 0.0, 0.0, 0.0, 0, 0, 7000, 1.0, "same", "none", "{}"),
            ],  # fmt: skip
        )
    try:
        text = _report(tmp_path).read_text()
    finally:
        with storage.transaction(pg_url) as cur:
            cur.execute("DELETE FROM quality.version_comparison WHERE run_id = 'view-kappa'")
            cur.execute("DELETE FROM quality.version_runs WHERE run_id = 'view-kappa'")
    runs = re.search(r'<table class="table table-sm" id="version-runs">.*?</table>', text).group(0)
    assert "stable &rarr; small-sketches" in runs and "worse on distinct_users (sketch error)" in runs
    row = re.search(r'<tr data-metric="distinct_users"><td>distinct_users</td><td>distinct</td>.*?</tr>', text)
    assert row and "0.01 / 0.002" in row.group(0) and "150 / 10 / 32" in row.group(0)
    assert "worse (sketch error)" in row.group(0) and "1e-30" in row.group(0)
