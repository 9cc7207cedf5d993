"""validate_day against the real Postgres: synthetic truth and stream rows for one day, checked with GX."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import date
from pathlib import Path

import pytest
from psycopg2 import sql

from batchmark import config, storage
from batchmark.definitions import Definitions, load_definitions
from batchmark.engine import WindowResult
from batchmark.errors import ConfigError
from batchmark.validation import ValidationReport, validate_day
from batchmark.windows import day_bounds_ms

DATABASE_URL = f"postgresql://postgres@127.0.0.1:5432/batchmark_test_validation_{os.getpid()}"
DAY = date(2026, 11, 24)
TENANTS = ("acme", "globex", "initech")
WINDOWS_PER_METRIC = len(TENANTS) * 1440  # 1-minute windows over one day


@pytest.fixture(scope="module")
def database():  # noqa: ANN201 - yields this session's own database, dropped afterwards
    storage.ensure_database(DATABASE_URL)
    yield DATABASE_URL
    conn = storage.connect(storage.server_url(DATABASE_URL))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(storage.db_name(DATABASE_URL)))
        )
    conn.close()


@pytest.fixture
def defs() -> Definitions:
    return load_definitions(Path(__file__).parent / "data" / "exact_metrics.toml")


@pytest.fixture
def settings(database: str, tmp_path: Path) -> config.Settings:
    """Settings on the test database, with the GX projects under the test's own directory."""
    gx_root = tmp_path / "gx"
    with storage.transaction(database) as cur:
        cur.execute(
            "TRUNCATE stream.results, truth.results, quality.metrics, quality.accuracy_history,"
            " quality.window_accuracy, quality.alerts, truth.recomputed CASCADE"
        )
    return dataclasses.replace(config.load(), database_url=database, gx_root=gx_root)


def _windows(defs: Definitions) -> list[WindowResult]:
    """One day of results per metric and tenant: jobs counts and cpu_seconds sums."""
    start, _ = day_bounds_ms(DAY)
    results = []
    for metric in defs.metrics:
        for t, tenant in enumerate(TENANTS):
            for minute in range(1440):
                s = start + minute * 60_000
                n = 1 + (minute * 7 + t) % 13
                value = float(n) if metric.kind == "count" else n * 37.25 + t
                results.append(WindowResult(metric.name, tenant, s, s + 60_000, value, n))
    return results


@pytest.fixture
def same_day(settings: config.Settings, defs: Definitions) -> list[WindowResult]:
    """Batch truth and stream results of DAY that agree exactly."""
    results = _windows(defs)
    rows = [(r.metric, r.group_key, r.window_start_ms, r.window_end_ms, r.value, r.n_events, None) for r in results]
    storage.replace_truth_day(settings.database_url, DAY, [m.name for m in defs.metrics], rows, "truth-run")
    with storage.transaction(settings.database_url) as cur:
        storage.upsert_stream_results(cur, results)
    return results


def _execute(settings: config.Settings, sql: str) -> int:
    with storage.transaction(settings.database_url) as cur:
        cur.execute(sql)
        return cur.rowcount


def _history(settings: config.Settings, run_id: str) -> dict[str, tuple]:
    with storage.transaction(settings.database_url) as cur:
        cur.execute(
            """SELECT metric, day, success, windows, missing, over_tolerance, max_error, tolerance, report_url
               FROM quality.accuracy_history WHERE run_id = %s""",
            (run_id,),
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def _by_metric(report: ValidationReport) -> dict:
    return {m.metric: m for m in report.metrics}


def _project_files(gx_root: Path) -> dict[str, str]:
    """The committed part of the GX project (everything but uncommitted/)."""
    return {
        str(p.relative_to(gx_root)): p.read_text()
        for p in sorted(gx_root.rglob("*"))
        if p.is_file() and p.relative_to(gx_root).parts[0] != "uncommitted"
    }


def test_identical_stream_and_truth_pass(settings, defs, same_day):
    report = validate_day(settings, defs, DAY, run_id="run-identical")

    assert report.success is True
    assert report.day == DAY and report.run_id == "run-identical"
    assert [m.metric for m in report.metrics] == ["jobs", "cpu_seconds"]
    for m in report.metrics:
        assert (m.success, m.windows, m.missing, m.over_tolerance) == (True, WINDOWS_PER_METRIC, 0, 0)
        assert m.max_error == 0.0 and m.mean_error == 0.0 and m.tolerance == 0.0
    assert report.summary_line() == (
        f"2026-11-24 PASS: jobs {WINDOWS_PER_METRIC} windows: 0 missing, 0 over tolerance 0 (max error 0), "
        f"0 incomplete; cpu_seconds {WINDOWS_PER_METRIC} windows: 0 missing, 0 over tolerance 0 (max error 0), "
        "0 incomplete; no records rejected"
    )
    for m in report.metrics:  # what the drift checks read besides the error
        assert (m.incomplete, m.impossible, m.within_tolerance) == (0, 0, True)
        assert m.report_page.startswith(f"validations/accuracy_{m.metric}/run-identical/")
        assert (report.docs_index.parent / m.report_page).is_file()
    assert report.metrics[0].truth_events > WINDOWS_PER_METRIC
    project = settings.gx_root / f"cluster_jobs-{storage.db_name(settings.database_url)}"
    assert settings.gx_project(defs.dataset.name) == project  # one project per dataset and database
    assert report.docs_index == project / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert report.docs_index.is_file()
    assert "accuracy_jobs" in report.docs_index.read_text()

    history = _history(settings, "run-identical")
    url = report.docs_index.as_uri()
    assert history == {
        "jobs": (DAY, True, WINDOWS_PER_METRIC, 0, 0, 0.0, 0.0, url),
        "cpu_seconds": (DAY, True, WINDOWS_PER_METRIC, 0, 0, 0.0, 0.0, url),
    }
    with storage.transaction(settings.database_url) as cur:
        cur.execute("SELECT metric, kind, tolerance FROM quality.metrics ORDER BY metric")
        assert cur.fetchall() == [("cpu_seconds", "sum", 0.0), ("jobs", "count", 0.0)]


def test_project_is_idempotent_and_holds_no_connection_string(settings, defs, same_day):
    validate_day(settings, defs, DAY)
    project = settings.gx_project(defs.dataset.name)
    files = _project_files(project)
    validate_day(settings, defs, DAY)

    assert _project_files(project) == files  # a re-run rewrites nothing that is committed
    assert {
        "expectations/accuracy_jobs.json",
        "expectations/accuracy_cpu_seconds.json",
        "validation_definitions/accuracy_jobs.json",
        "checkpoints/nightly_accuracy.json",
    } <= set(files)
    assert "connection_string: ${BATCHMARK_GX_CONNECTION}" in files["great_expectations.yml"]
    for path in project.rglob("*"):
        if path.is_file() and path.suffix in (".yml", ".json", ".html"):
            assert "127.0.0.1:5432" not in path.read_text(), path
    with storage.transaction(settings.database_url) as cur:
        cur.execute("SELECT count(*), count(DISTINCT run_id) FROM quality.accuracy_history")
        assert cur.fetchone() == (4, 2)


def test_altered_stream_value_fails_only_that_metric(settings, defs, same_day):
    changed = _execute(
        settings,
        """UPDATE stream.results SET value = value * 1.5
           WHERE metric = 'cpu_seconds' AND group_key = 'globex' AND window_start = '2026-11-24 10:00:00+00'""",
    )
    assert changed == 1

    report = validate_day(settings, defs, DAY, run_id="run-altered")

    assert report.success is False
    cpu, jobs = _by_metric(report)["cpu_seconds"], _by_metric(report)["jobs"]
    assert (cpu.success, cpu.windows, cpu.missing, cpu.over_tolerance) == (False, WINDOWS_PER_METRIC, 0, 1)
    assert cpu.max_error == pytest.approx(0.5)
    assert cpu.mean_error == pytest.approx(0.5 / WINDOWS_PER_METRIC)
    assert (jobs.success, jobs.missing, jobs.over_tolerance, jobs.max_error) == (True, 0, 0, 0.0)
    assert report.summary_line().startswith("2026-11-24 FAIL: jobs ")
    assert f"cpu_seconds {WINDOWS_PER_METRIC} windows: 0 missing, 1 over tolerance 0 (max error 0.5), 0 incomplete" in (
        report.summary_line()
    )
    assert (cpu.within_tolerance, jobs.within_tolerance) == (False, True)

    history = _history(settings, "run-altered")
    assert history["cpu_seconds"][1:5] == (False, WINDOWS_PER_METRIC, 0, 1)
    assert history["jobs"][1:5] == (True, WINDOWS_PER_METRIC, 0, 0)

    # The stored validation result (shown in the Data Docs) names the failing window.
    results = list(
        (settings.gx_project(defs.dataset.name) / "uncommitted" / "validations" / "accuracy_cpu_seconds").rglob(
            "*.json"
        )
    )
    stored = json.loads(results[0].read_text())
    between = next(r for r in stored["results"] if r["expectation_config"]["type"].endswith("_between"))
    assert between["result"]["partial_unexpected_index_list"] == [
        {"group_key": "globex", "window_start": "2026-11-24T10:00:00+00:00", "error": 0.5}
    ]


def test_deleted_stream_row_is_missing(settings, defs, same_day):
    deleted = _execute(
        settings,
        """DELETE FROM stream.results
           WHERE metric = 'jobs' AND group_key = 'acme' AND window_start = '2026-11-24 23:59:00+00'""",
    )
    assert deleted == 1

    report = validate_day(settings, defs, DAY, run_id="run-missing")

    assert report.success is False
    jobs, cpu = _by_metric(report)["jobs"], _by_metric(report)["cpu_seconds"]
    assert (jobs.success, jobs.windows, jobs.missing, jobs.over_tolerance) == (False, WINDOWS_PER_METRIC, 1, 0)
    assert jobs.max_error == 0.0  # the missing window has no relative error
    assert (cpu.success, cpu.missing, cpu.over_tolerance) == (True, 0, 0)
    assert f"jobs {WINDOWS_PER_METRIC} windows: 1 missing, 0 over tolerance 0" in report.summary_line()
    assert jobs.within_tolerance is True  # missing is not over tolerance: the two are named apart
    assert _history(settings, "run-missing")["jobs"][1:5] == (False, WINDOWS_PER_METRIC, 1, 0)


def test_tolerance_follows_the_definitions(settings, defs, same_day):
    _execute(
        settings,
        """UPDATE stream.results SET value = value * 1.01
           WHERE metric = 'cpu_seconds' AND group_key = 'acme' AND window_start = '2026-11-24 00:00:00+00'""",
    )
    assert validate_day(settings, defs, DAY).success is False

    loose = dataclasses.replace(
        defs,
        metrics=tuple(dataclasses.replace(m, tolerance=0.02) if m.name == "cpu_seconds" else m for m in defs.metrics),
    )
    report = validate_day(settings, loose, DAY, run_id="run-loose")

    cpu = _by_metric(report)["cpu_seconds"]
    assert report.success is True
    assert (cpu.success, cpu.over_tolerance, cpu.tolerance) == (True, 0, 0.02)
    assert cpu.max_error == pytest.approx(0.01)
    suite = json.loads(
        (settings.gx_project(defs.dataset.name) / "expectations" / "accuracy_cpu_seconds.json").read_text()
    )
    between = next(e for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_between")
    assert between["kwargs"]["max_value"] == 0.02
    assert _history(settings, "run-loose")["cpu_seconds"][6] == 0.02

    # A metric dropped from the definitions loses its suite and validation definition.
    only_jobs = dataclasses.replace(defs, metrics=(defs.metric("jobs"),))
    assert [m.metric for m in validate_day(settings, only_jobs, DAY).metrics] == ["jobs"]
    assert not (settings.gx_project(defs.dataset.name) / "expectations" / "accuracy_cpu_seconds.json").exists()
    assert not (
        settings.gx_project(defs.dataset.name) / "validation_definitions" / "accuracy_cpu_seconds.json"
    ).exists()


def test_no_truth_for_the_day_is_refused(settings, defs, same_day):
    other_day = date(2026, 11, 23)
    with pytest.raises(ConfigError, match=r"no batch truth for 2026-11-23.*batch recompute"):
        validate_day(settings, defs, other_day)

    with storage.transaction(settings.database_url) as cur:
        cur.execute("SELECT count(*) FROM quality.accuracy_history")
        assert cur.fetchone() == (0,)
        cur.execute("SELECT count(*) FROM quality.metrics")
        assert cur.fetchone() == (2,)  # the tolerances are written before the refusal


def test_a_count_that_lost_one_event_and_doubled_another_is_incomplete_and_alerts(settings, defs, same_day):
    """The stream's count equals the truth (one event lost, another counted twice): the kind's error is 0, GX
    passes, and the completeness check still fails the metric."""
    from batchmark import alerts

    _execute(
        settings,
        """INSERT INTO quality.window_accuracy (metric, group_key, window_start, day, stream_value, error,
               n_lost, n_dup, n_late) VALUES ('jobs', 'acme', '2026-11-24 10:00:00+00', '2026-11-24', 1, 0, 1, 1, 0)""",
    )
    report = validate_day(settings, defs, DAY, run_id="run-lost-and-doubled")
    jobs = _by_metric(report)["jobs"]

    assert (jobs.success, jobs.max_error, jobs.incomplete, jobs.lost_events, jobs.duplicate_events) == (
        True,
        0,
        1,
        1,
        1,
    )
    assert f"jobs {WINDOWS_PER_METRIC} windows: 0 missing, 0 over tolerance 0 (max error 0), 1 incomplete" in (
        report.summary_line()
    )
    raised = alerts.evaluate_day(settings, defs, DAY)
    assert [(a.metric, a.check, a.severity) for a in raised] == [("jobs", "completeness", "error")]
    assert "1 of 4320 truth windows incomplete (1 with truth events the stream did not fold)" in raised[0].message


def test_a_bin_packing_below_what_the_items_need_fails_completeness(settings, tmp_path):
    """22 bins where the truth's FFD needed 123: FF/FFD = 0.18 is far inside the 1.7 tolerance, but no packing
    of those items fits in fewer than (9 x 123 - 6) / 11 = 100 bins, so the stream missed items."""
    from batchmark import alerts

    path = tmp_path / "binpack.toml"
    text = (Path(__file__).parent / "data" / "exact_metrics.toml").read_text()
    path.write_text(
        text[: text.index("[[metric]]")]
        + '[[metric]]\nname = "node_packing"\nkind = "binpack"\nvalue = "mem_gb"\ncapacity = 128.0\n'
        'group_by = ["tenant"]\nwindow = "5m"\nallowed_lateness = "30s"\n'
    )
    packing = load_definitions(path)
    start, _ = day_bounds_ms(DAY)
    truth = [("node_packing", "acme", start, start + 300_000, 123.0, 900, None)]
    truth.append(("node_packing", "globex", start, start + 300_000, 10.0, 50, None))
    storage.replace_truth_day(settings.database_url, DAY, ["node_packing"], truth, "truth-run")
    with storage.transaction(settings.database_url) as cur:
        storage.upsert_stream_results(
            cur,
            [
                WindowResult("node_packing", "acme", start, start + 300_000, 22.0, 900),  # same events counted
                WindowResult("node_packing", "globex", start, start + 300_000, 11.0, 50),  # FF 1.1x FFD: fine
            ],
        )

    report = validate_day(settings, packing, DAY, run_id="run-packing")
    (m,) = report.metrics
    assert (m.success, m.within_tolerance, m.impossible, m.incomplete) == (True, True, 1, 0)
    raised = alerts.evaluate_day(settings, packing, DAY)
    assert [(a.metric, a.check) for a in raised] == [("node_packing", "completeness")]
    assert "1 with fewer bins than the truth's items need" in raised[0].message


def test_data_docs_work_offline_in_a_browser(settings, defs, same_day):
    """Every page of the site loads vendored assets only; Chromium, with every request that leaves the disk
    blocked, lists the validations on the index (its table is built by jQuery + bootstrap-table) and renders a
    validation page."""
    import re

    from playwright.sync_api import sync_playwright

    from batchmark import reports
    from tests.browser import CHROMIUM, block_outside

    validate_day(settings, defs, DAY, run_id="run-offline-1")
    report = validate_day(settings, defs, DAY, run_id="run-offline-2")
    site = report.docs_index.parent
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 5
    for page in pages:
        text = page.read_text()
        assert reports.external_resources(text) == [], page
        for ref in re.findall(r'(?:src|href)="([^"#:]+\.(?:js|css))"', text):
            assert (page.parent / ref).resolve().is_file(), (page, ref)

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        block_outside(page, ("file://", "data:"), outside)
        page.goto(report.docs_index.as_uri())
        rows = page.locator("table tbody tr")
        rows.first.wait_for(timeout=15_000)
        listed = " ".join(page.locator("table tbody").all_inner_texts())
        assert "accuracy_jobs" in listed and "accuracy_cpu_seconds" in listed and "run-offline-2" in listed
        assert page.evaluate("typeof jQuery !== 'undefined' && typeof jQuery.fn.bootstrapTable === 'function'")
        jobs = site / report.metrics[0].report_page
        page.goto(jobs.as_uri())
        assert "accuracy_jobs" in page.content()
        figures = page.locator("#batchmark-figures").inner_text()  # what GX's own page leaves out
        assert f"jobs {WINDOWS_PER_METRIC} windows: 0 missing, 0 over tolerance 0 (max error 0), 0 incomplete" in (
            figures
        )
        assert "no late, lost or duplicated events" in figures and "This day in the Accuracy view" in figures
        assert "Input that day: no records rejected" in figures
        # the decision rule, on the page too: one validated day is not enough history to drop the batch
        assert "Decision: keep the nightly batch (only " in figures and "within the bound 0 and complete" in figures
        assert page.evaluate("getComputedStyle(document.body).fontFamily").startswith("-apple-system")  # bootstrap
        page.screenshot(path=str(settings.home / "data-docs-offline.png"), full_page=False)
        browser.close()
    assert outside == [], outside


def test_another_datasets_validation_writes_its_own_project_and_leaves_the_repository_alone(
    settings, defs, same_day, tmp_path
):
    import subprocess

    home_settings = dataclasses.replace(settings, gx_root=config.load().gx_root)  # the default: the runtime home
    assert config.REPO_ROOT not in home_settings.gx_root.parents
    other = tmp_path / "other.toml"
    other.write_text(defs.source.read_text().replace('name = "cluster_jobs"', 'name = "other_jobs"', 1))
    other_defs = load_definitions(other)
    before = subprocess.run(["git", "status", "--porcelain"], cwd=config.REPO_ROOT, capture_output=True, text=True)
    report = validate_day(home_settings, other_defs, DAY, run_id="run-other-dataset")
    after = subprocess.run(["git", "status", "--porcelain"], cwd=config.REPO_ROOT, capture_output=True, text=True)
    assert after.stdout == before.stdout  # nothing in the repository was written or deleted
    project = home_settings.gx_project("other_jobs")
    assert report.docs_index.is_relative_to(project) and (project / "expectations" / "accuracy_jobs.json").is_file()
    assert project != home_settings.gx_project("cluster_jobs")  # Data Docs per dataset
    assert not (config.REPO_ROOT / "expectations" / "expectations").exists()  # only the template is tracked


def test_a_day_certified_empty_passes_with_no_window_and_a_never_recomputed_day_is_refused(settings, defs):
    empty_day = date(2026, 11, 20)
    with pytest.raises(ConfigError, match="there is no batch truth for 2026-11-20"):
        validate_day(settings, defs, empty_day)
    storage.replace_truth_day(settings.database_url, empty_day, [m.name for m in defs.metrics], [], "empty-run")
    report = validate_day(settings, defs, empty_day, run_id="run-empty")
    assert report.success is True
    assert [(m.metric, m.windows, m.missing, m.over_tolerance, m.success) for m in report.metrics] == [
        ("jobs", 0, 0, 0, True),
        ("cpu_seconds", 0, 0, 0, True),
    ]
    assert report.summary_line().startswith("2026-11-20 PASS: jobs 0 windows: 0 missing")
    stray = [r for r in _windows(defs) if r.metric == "jobs"][:3]  # the stream saw events the truth did not
    stray = [dataclasses.replace(r, window_start_ms=r.window_start_ms - 4 * 86_400_000) for r in stray]
    with storage.transaction(settings.database_url) as cur:
        storage.upsert_stream_results(cur, stray)
    with pytest.raises(ConfigError, match="the batch truth of 2026-11-20 has no window but the stream wrote 3"):
        validate_day(settings, defs, empty_day)


def test_a_metric_with_no_window_that_day_is_judged_when_it_was_recomputed(settings, defs, same_day):
    only_jobs = [r for r in same_day if r.metric == "jobs"]
    rows = [(r.metric, r.group_key, r.window_start_ms, r.window_end_ms, r.value, r.n_events, None) for r in only_jobs]
    storage.replace_truth_day(settings.database_url, DAY, [m.name for m in defs.metrics], rows, "truth-jobs-only")
    _execute(settings, "DELETE FROM stream.results WHERE metric = 'cpu_seconds'")
    report = validate_day(settings, defs, DAY, run_id="run-no-cpu")
    assert report.success is True and _by_metric(report)["cpu_seconds"].windows == 0
    _execute(settings, "DELETE FROM truth.recomputed WHERE metric = 'cpu_seconds'")  # an older truth: no record
    with pytest.raises(ConfigError, match="has no windows for cpu_seconds"):
        validate_day(settings, defs, DAY)


def test_the_days_rejections_are_in_the_summary_line_and_the_report(settings, defs, same_day):
    with storage.transaction(settings.database_url) as cur:
        cur.execute("DELETE FROM stream.rejections; DELETE FROM quality.rejections")
        storage.add_stream_rejections(
            cur, settings.events_topic, 0, "e1", {(DAY, "missing_field"): 3, (DAY, "wrong_type"): 2}
        )
        storage.add_stream_rejections(cur, settings.events_topic, 1, "e1", {(DAY, "missing_field"): 1})
        storage.add_stream_rejections(cur, "another-topic", 0, "e1", {(DAY, "invalid_json"): 7})  # not this dataset
        cur.execute("INSERT INTO quality.rejections VALUES (%s, 'lake', 'out_of_range', 2)", (DAY,))
    report = validate_day(settings, defs, DAY, run_id="run-rejections")
    assert report.summary_line().endswith(
        "; 8 records rejected (lake: out_of_range 2; stream: missing_field 4, wrong_type 2)"
    )
    page = (report.docs_index.parent / report.metrics[0].report_page).read_text()
    assert "Input that day: 8 records rejected (lake: out_of_range 2; stream: missing_field 4, wrong_type 2)" in page
    with storage.transaction(settings.database_url) as cur:  # the drift checks' input: each record once, per topic
        cur.execute("SELECT source, topic, reason, records FROM quality.rejected_records WHERE day = %s", (DAY,))
        assert sorted(cur.fetchall(), key=str) == sorted(
            [
                ("stream", settings.events_topic, "missing_field", 4),
                ("stream", settings.events_topic, "wrong_type", 2),
                ("stream", "another-topic", "invalid_json", 7),
                ("lake", None, "out_of_range", 2),
            ],
            key=str,
        )  # every count per day, source and reason in one quality view
        assert storage.rejected_per_day(cur, settings.events_topic, DAY) == {DAY: 8}
        assert storage.rejected_per_day(cur, "another-topic", DAY) == {DAY: 7 + 2}  # (the lake's are per day)
        cur.execute("INSERT INTO quality.rejections VALUES (%s, 'archive', 'invalid_json', 5)", (DAY,))
        assert storage.rejected_per_day(cur, settings.events_topic, DAY) == {DAY: 6 + 2}  # the same records twice
        cur.execute("DELETE FROM stream.rejections; DELETE FROM quality.rejections")
