"""Nightly accuracy check: one day of stream results against the batch truth, with Great Expectations.

The GX project of a dataset is generated under the runtime home (``settings.gx_project``: one per dataset and
database) from the hand-written template ``expectations/great_expectations.yml``; the repository is never
written. Every run brings the project in line with the definitions file: a Postgres datasource whose connection
string is the ``${BATCHMARK_GX_CONNECTION}`` variable (never stored), a query asset on the view
``quality.comparison`` batched by its ``day`` column, one suite per metric (completeness and relative error
within tolerance), one validation definition per suite and one checkpoint that runs them all and updates the
Data Docs.

Pass or fail comes from the checkpoint, and so do the counts of missing and over-tolerance windows; the
number of windows and the max and mean relative error are read from the view with SQL. Every run appends one
row per metric to ``quality.accuracy_history``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import great_expectations as gx
import psycopg2.extras
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core.batch_definition import BatchDefinition
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.core.partitioners import PartitionerColumnValue
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context import FileDataContext
from great_expectations.datasource.fluent import PostgresDatasource
from great_expectations.datasource.fluent.sql_datasource import QueryAsset
from great_expectations.exceptions import DataContextError
from great_expectations.expectations.row_conditions import Column

from batchmark import reports, storage
from batchmark.aggregates import impossible_sql
from batchmark.config import Settings
from batchmark.definitions import Definitions, Metric
from batchmark.errors import BatchmarkError, ConfigError

log = logging.getLogger(__name__)
GX_CONNECTION_VAR = "BATCHMARK_GX_CONNECTION"
DATASOURCE = "batchmark"
ASSET = "comparison"
# A query asset, not a table asset: TableAsset.schema_name is deprecated and Postgres datasources have no
# other place for a schema. Postgres inlines the subquery, so the per-day filter still uses the day index.
ASSET_QUERY = "SELECT * FROM quality.comparison"
BATCH_DEFINITION = "by_day"
CHECKPOINT = "nightly_accuracy"
SUITE_PREFIX = "accuracy_"
DOCS_SITE = "local_site"
# Which windows a failed check lists in the Data Docs and the checkpoint result.
RESULT_FORMAT = {"result_format": "SUMMARY", "unexpected_index_column_names": ["group_key", "window_start"]}


@dataclasses.dataclass
class MetricAccuracy:
    """One metric's figures for one day: how many batch-truth windows, how many missing or off, how far off.

    The fields are in the column order of quality.accuracy_history.
    """

    metric: str
    success: bool
    windows: int
    missing: int
    over_tolerance: int
    max_error: float | None  # the kind's accuracy measure: relative error, rank error, 1 - recall, FF/FFD
    mean_error: float | None
    tolerance: float
    kind: str = ""
    late_events: int = 0  # where the differences come from (quality.window_accuracy, from the Spark job)
    duplicate_events: int = 0
    lost_events: int = 0
    incomplete: int = 0  # windows where the stream did not fold every truth event (lost or dropped as late)
    impossible: int = 0  # bin packing: windows with fewer stream bins than the truth's items need
    within_tolerance: bool = True  # the GX tolerance expectation alone (success also needs no missing window)
    truth_events: int = 0
    sketch_effect: float | None = None  # sum over windows of |stream - value of what it saw|: the sketch's part
    report_page: str | None = None  # the metric's validation page, relative to the Data Docs root

    def describe(self) -> str:
        """The metric's figures in the one wording used everywhere (CLI, demo, DAG logs, alerts)."""
        return describe(
            self.metric,
            self.windows,
            self.missing,
            self.over_tolerance,
            self.incomplete + self.impossible,
            self.max_error,
            self.tolerance,
        )

    def causes(self) -> str:
        """Where the differences came from, e.g. '120 late, 600 lost events' ('' when none)."""
        return causes(self.late_events, self.lost_events, self.duplicate_events)


@dataclasses.dataclass
class ValidationReport:
    """The outcome of validating one day: overall and per metric, with where to read the Data Docs."""

    day: date
    run_id: str
    success: bool
    metrics: list[MetricAccuracy]
    docs_index: Path
    rejected: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # storage.day_rejections

    def summary_line(self) -> str:
        """One line for logs and alerts, e.g. '2026-11-24 PASS: jobs 1440 windows: 0 missing, 0 over tolerance 0
        (max error 0), 0 incomplete; ...; 12 records rejected (stream: invalid_json 12)'."""
        return summary_line(self.day, self.success, self.metrics) + "; " + rejections_text(self.rejected)


def describe(
    metric: str, windows: int, missing: int, over: int, incomplete: int, max_error: float | None, tolerance: float
) -> str:
    """One metric's day in the product's one wording: missing windows (no stream result) apart from windows
    over tolerance (a result, but too far off) and incomplete ones (the stream did not fold every event)."""
    return (
        f"{metric} {windows} windows: {missing} missing, {over} over tolerance {_fmt(tolerance)} "
        f"(max error {_fmt(max_error)}), {incomplete} incomplete"
    )


def causes(late: int, lost: int, duplicate: int) -> str:
    """The event counts that explain differences, e.g. '120 late, 600 lost events' ('' when none)."""
    parts = [f"{n} {what}" for n, what in ((late, "late"), (lost, "lost"), (duplicate, "duplicated")) if n]
    return f"{', '.join(parts)} events" if parts else ""


def summary_line(day: date, success: bool, metrics: list[MetricAccuracy]) -> str:
    """The day's verdict and every metric's figures (with their causes where there are any), on one line."""
    parts = []
    for m in metrics:
        text = m.describe()
        if m.causes():
            text += f" ({m.causes()})"
        parts.append(text)
    return f"{day.isoformat()} {'PASS' if success else 'FAIL'}: " + "; ".join(parts)


def rejections_text(rejected: dict[str, dict[str, int]]) -> str:
    """'12 records rejected (stream: invalid_json 10, missing_field 2)' or 'no records rejected': what the day
    lost to the definitions' rules, each record once (storage.rejected_once)."""
    total = storage.rejected_once({source: sum(reasons.values()) for source, reasons in rejected.items()})
    if not total:
        return "no records rejected"
    parts = [
        f"{where}: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        for where, reasons in sorted(rejected.items())
        if reasons
    ]
    return f"{total} records rejected ({'; '.join(parts)})"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def suite_name(metric: str) -> str:
    """Name of a metric's expectation suite (and of its validation definition)."""
    return SUITE_PREFIX + metric


def validate_day(settings: Settings, defs: Definitions, day: date, run_id: str | None = None) -> ValidationReport:
    """Check one day of stream results against the batch truth, record the outcome and return it.

    Raises ConfigError when there is no batch truth for that day (or for one of the metrics).
    """
    run_time = datetime.now(tz=UTC)
    run_id = run_id or f"validate_{day.isoformat()}_{run_time:%Y%m%dT%H%M%S%fZ}"
    url = settings.database_url
    storage.ensure_database(url)
    with storage.transaction(url) as cur:
        write_tolerances(cur, defs)
        figures = _day_figures(cur, defs, day)
        recomputed = storage.recomputed_metrics(cur, day)
        rejected = storage.day_rejections(cur, day, settings.events_topic)
    _require_truth(defs, day, figures, recomputed)
    for m in defs.metrics:  # recomputed with no window that day (an empty day, nothing the metric reads)
        figures.setdefault(m.name, (0, None, None, 0, 0, 0, 0, 0, 0, None))
    project = gx_project(settings, defs)
    if not any(f[0] for f in figures.values()):
        return _empty_day_report(settings, defs, day, run_id, project, rejected)

    with _project_lock(project):
        context = gx.get_context(
            mode="file",
            context_root_dir=project,
            runtime_environment={GX_CONNECTION_VAR: settings.sqlalchemy_url},
        )
        checkpoint = _sync_project(context, defs)
        result = checkpoint.run(
            batch_parameters={"day": day.isoformat()},  # a date column's batches are matched by ISO text
            run_id=RunIdentifier(run_name=run_id, run_time=run_time),
        )
        docs_index = _site_path(context.get_docs_sites_urls(site_name=DOCS_SITE))
        reports.make_offline(docs_index.parent)  # every page loads vendored assets only: it works offline
        pages = {  # each metric's validation page, relative to the Data Docs root (served over HTTP by the plugin)
            vr.suite_name: _site_path(context.get_docs_sites_urls(resource_identifier=identifier, site_name=DOCS_SITE))
            .relative_to(docs_index.parent)
            .as_posix()
            for identifier, vr in result.run_results.items()
        }

    by_suite = {vr.suite_name: vr for vr in result.run_results.values()}
    metrics = [
        _metric_accuracy(m, by_suite[suite_name(m.name)], figures[m.name], pages.get(suite_name(m.name)))
        for m in defs.metrics
    ]
    report = ValidationReport(
        day=day, run_id=run_id, success=bool(result.success), metrics=metrics, docs_index=docs_index, rejected=rejected
    )
    _record(url, report)
    decisions = _decisions(settings, defs, day)
    for m in metrics:  # what GX's page does not say: the kind's max error, the window counts, the causes
        if m.report_page:
            try:
                figures_html = _figures_html(
                    m, day, settings.report_url, rejections_text(rejected), decisions.get(m.metric)
                )
                reports.annotate(docs_index.parent / m.report_page, figures_html)
            except (OSError, UnicodeError) as exc:  # a page we cannot rewrite must not lose the day's record
                log.warning("could not add batchmark's figures to %s: %s", m.report_page, exc)
    return report


def _empty_day_report(
    settings: Settings, defs: Definitions, day: date, run_id: str, project: Path, rejected: dict[str, dict[str, int]]
) -> ValidationReport:
    """A day certified empty (truth recomputed, no window for any metric, no stream window either): it passes
    with 0 windows. GX has no batch to validate on a day without rows, so no checkpoint runs and no page is
    written; the day is recorded in quality.accuracy_history like any other. Stream windows on such a day mean
    the truth is wrong (the lake lost the day), not the stream: refused."""
    with storage.transaction(settings.database_url) as cur:
        cur.execute("SELECT count(*) FROM stream.results WHERE day = %s", (day,))
        stream_windows = cur.fetchone()[0]
    if stream_windows:
        raise ConfigError(
            f"the batch truth of {day} has no window but the stream wrote {stream_windows}: the recompute did not "
            f"see the day's events (a lost lake partition?). Restore or replay the day, recompute it, then validate."
        )
    metrics = [
        MetricAccuracy(m.name, True, 0, 0, 0, None, None, m.tolerance, kind=m.kind, within_tolerance=True)
        for m in defs.metrics
    ]
    docs_index = project / "uncommitted" / "data_docs" / "local_site" / "index.html"
    report = ValidationReport(day, run_id, True, metrics, docs_index, rejected)
    _record(settings.database_url, report)
    return report


def _decisions(settings: Settings, defs: Definitions, day: date) -> dict[str, tuple[str, str]]:
    """Each metric's decision (stream alone enough, or keep the nightly batch) over the validated days up to
    `day`, by the rule in drift.decision."""
    from batchmark import drift
    from batchmark.alerts import history

    by_metric, _ = history(settings.database_url, day, settings.events_topic)
    return {
        m.name: drift.decision(
            by_metric.get(m.name, []), settings.decision_days, m.aggregate.bound(), m.aggregate.error_name
        )
        for m in defs.metrics
    }


def _figures_html(
    m: MetricAccuracy, day: date, report_url: str, rejected: str = "", decision: tuple[str, str] | None = None
) -> str:
    """The figures block batchmark adds to a metric's validation page."""
    import html

    view = (
        report_url.removesuffix("/reports") + f"/accuracy?day={day.isoformat()}"
        if report_url.endswith("/reports")
        else None
    )
    parts = [
        f"<strong>batchmark, {html.escape(m.metric)} ({html.escape(m.kind)}) on {day.isoformat()}:</strong> "
        f"{html.escape(m.describe())}.",
        f"Mean error {_fmt(m.mean_error)}; {m.truth_events} truth events; "
        f"{html.escape(m.causes() or 'no late, lost or duplicated events')}; "
        f"the sketch's own part {_fmt(m.sketch_effect or 0)}.",
    ]
    if rejected:
        parts.append(f"Input that day: {html.escape(rejected)} (batchmark dlq lists the dead letters).")
    if decision:
        parts.append(f"<strong>Decision: {html.escape(decision[0])}</strong> ({html.escape(decision[1])}).")
    if view:
        parts.append(f'<a href="{html.escape(view)}">This day in the Accuracy view</a>')
    return "<br>".join(parts)


def _site_path(urls: list[dict[str, Any]]) -> Path:
    """The local file of a Data Docs URL (GX answers file:// URLs for a local site)."""
    return Path(url2pathname(urlsplit(urls[0]["site_url"]).path))


def write_tolerances(cur: Any, defs: Definitions) -> None:
    """Upsert each metric's kind and tolerance into quality.metrics, which the comparison view joins."""
    psycopg2.extras.execute_values(
        cur,
        """INSERT INTO quality.metrics (metric, kind, tolerance, mostly) VALUES %s
           ON CONFLICT (metric) DO UPDATE SET kind = EXCLUDED.kind, tolerance = EXCLUDED.tolerance,
                                              mostly = EXCLUDED.mostly""",
        [(m.name, m.kind, m.tolerance, m.mostly) for m in defs.metrics],
    )


# A window is incomplete when the stream has a result but did not fold every truth event: some never landed
# (lost) or were dropped as late, or it simply counted fewer. A value is impossible when no correct run of its
# kind could give it (each kind's impossible_sql; e.g. fewer bins than any packing of the truth's items).
INCOMPLETE = (
    "stream_events IS NOT NULL AND (coalesce(n_lost, 0) + coalesce(n_late, 0) > 0 OR stream_events < batch_events)"
)


def _day_figures(cur: Any, defs: Definitions, day: date) -> dict[str, tuple[Any, ...]]:
    """{metric: (windows, max error, mean error, late, duplicate, lost events, incomplete, impossible, truth
    events, sketch effect)} of one day, from the view."""
    cur.execute(
        f"""SELECT metric, count(*), max(error), avg(error) FILTER (WHERE error < 'Infinity'),
                  coalesce(sum(n_late), 0), coalesce(sum(n_dup), 0), coalesce(sum(n_lost), 0),
                  count(*) FILTER (WHERE {INCOMPLETE}), count(*) FILTER (WHERE {impossible_sql()}),
                  coalesce(sum(batch_events), 0), sum(abs(sketch_effect))
           FROM quality.comparison WHERE day = %s AND metric = ANY(%s) GROUP BY metric""",
        (day, [m.name for m in defs.metrics]),
    )
    return {row[0]: tuple(row[1:]) for row in cur.fetchall()}


def _require_truth(defs: Definitions, day: date, figures: dict[str, Any], recomputed: dict[str, int]) -> None:
    """Refuse to validate a day (or a metric) the batch recompute has not produced truth for. A metric the
    recompute ran for is judged even with no window (truth.recomputed), e.g. on a day certified empty."""
    if not figures and not recomputed:
        raise ConfigError(
            f"there is no batch truth for {day}: nothing to compare the stream against. "
            f"Run the Spark batch recompute for {day} first, then validate again."
        )
    missing = [m.name for m in defs.metrics if m.name not in figures and m.name not in recomputed]
    if missing:
        raise ConfigError(
            f"the batch truth for {day} has no windows for {', '.join(missing)} (added to the definitions "
            f"after the recompute?). Run the Spark batch recompute for {day} again, then validate again."
        )


TEMPLATE = Path(__file__).resolve().parent.parent / "expectations" / "great_expectations.yml"


def gx_project(settings: Settings, defs: Definitions) -> Path:
    """The dataset's GX project directory, created from the template on first use."""
    project = settings.gx_project(defs.dataset.name)
    config_file = project / "great_expectations.yml"
    if not config_file.exists():
        project.mkdir(parents=True, exist_ok=True)
        tmp = config_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(TEMPLATE.read_text())
        tmp.replace(config_file)  # atomic: a concurrent first run sees the whole file or none
    return project


@contextlib.contextmanager
def _project_lock(gx_root: Path) -> Iterator[None]:
    """Serialize runs that share a GX project: its stores are plain files rewritten on every run."""
    lock_dir = gx_root / "uncommitted"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".batchmark.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sync_project(context: FileDataContext, defs: Definitions) -> gx.Checkpoint:
    """Bring datasource, suites, validation definitions and checkpoint in line with the definitions."""
    batch_definition = _batch_definition(context)
    validations = []
    for metric in defs.metrics:
        suite = _suite(metric)
        _keep_expectation_ids(context, suite)
        suite = context.suites.add_or_update(suite)
        validations.append(
            context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite)
            )
        )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=CHECKPOINT,
            validation_definitions=validations,
            actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
            result_format=RESULT_FORMAT,
        )
    )
    # Metrics dropped from the definitions: their suites and validation definitions go too.
    wanted = {suite_name(m.name) for m in defs.metrics}
    for vd in list(context.validation_definitions.all()):
        if vd.name.startswith(SUITE_PREFIX) and vd.name not in wanted:
            context.validation_definitions.delete(vd.name)
    for suite in list(context.suites.all()):
        if suite.name.startswith(SUITE_PREFIX) and suite.name not in wanted:
            context.suites.delete(suite.name)
    return checkpoint


def _keep_expectation_ids(context: FileDataContext, suite: gx.ExpectationSuite) -> None:
    """Give unchanged expectations their stored ids, so the suite files only change when the checks do.

    GX 1.24.1's suites.add_or_update means to do this, but compares expectations including their id.
    meta and notes are left out of the comparison: batchmark sets neither (a stored one reads back as {}).
    """
    fields = {"id", "rendered_content", "meta", "notes"}
    try:
        stored = context.suites.get(suite.name).expectations
    except DataContextError:
        return
    for expectation in suite.expectations:
        content = expectation.dict(exclude=fields)
        for old in stored:
            if old.dict(exclude=fields) == content:
                expectation.id = old.id
                break


def _batch_definition(context: FileDataContext) -> BatchDefinition:
    """The per-day batch of quality.comparison; the project file is only rewritten when something differs."""
    template = "${" + GX_CONNECTION_VAR + "}"
    ds = context.data_sources.all().get(DATASOURCE)
    if not (
        isinstance(ds, PostgresDatasource) and str(ds.connection_string) == template and ds.create_temp_table is False
    ):
        ds = context.data_sources.add_or_update_postgres(
            DATASOURCE, connection_string=template, create_temp_table=False
        )
    try:
        asset = ds.get_asset(ASSET)  # not get_assets_as_dict(): only get_asset links the asset to ds
    except LookupError:
        asset = None
    if not (isinstance(asset, QueryAsset) and asset.query == ASSET_QUERY):
        if asset is not None:
            ds.delete_asset(ASSET)
        asset = ds.add_query_asset(ASSET, query=ASSET_QUERY)
    partitioner = PartitionerColumnValue(column_name="day")
    try:
        batch_definition = asset.get_batch_definition(BATCH_DEFINITION)
        if batch_definition.partitioner == partitioner:
            return batch_definition
        asset.delete_batch_definition(BATCH_DEFINITION)
    except KeyError:
        pass
    # A column-value partitioner filters with "day = <value>" (the daily one with EXTRACT(...), which scans
    # every day in the view); GX only pre-validates the yearly/monthly/daily ones, hence no validation here.
    return asset.add_batch_definition(BATCH_DEFINITION, partitioner=partitioner, validate_partitioner=False)


def _suite(metric: Metric) -> gx.ExpectationSuite:
    """A metric's checks: every batch-truth window has a stream row, and its kind's error is within tolerance.

    The error is the kind's own measure (relative error, rank error, 1 - recall@k, FF/FFD); `mostly` lets a
    sketch miss its 3-sigma / 99% bound on the share of windows theory allows.
    """
    name = metric.name  # lower_snake_case, checked by load_definitions: safe inside SQL text
    return gx.ExpectationSuite(
        name=suite_name(name),
        expectations=[
            gx.expectations.UnexpectedRowsExpectation(
                unexpected_rows_query=(
                    "SELECT group_key, window_start, batch_value FROM {batch} "
                    f"WHERE metric = '{name}' AND stream_events IS NULL"
                ),
                description=f"Every batch-truth window of {name} has a stream result",
            ),
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="error",
                min_value=0,
                max_value=metric.tolerance,
                mostly=metric.mostly,
                row_condition=Column("metric") == name,
                description=f"{metric.aggregate.error_name.capitalize()} of {name} per window is at most "
                f"{metric.tolerance:g}" + (f" in {metric.mostly:.0%} of windows" if metric.mostly < 1 else ""),
            ),
        ],
    )


def _metric_accuracy(
    metric: Metric, vr: ExpectationSuiteValidationResult, figures: tuple[Any, ...], page: str | None = None
) -> MetricAccuracy:
    """Join a metric's GX outcome (success, missing, over tolerance) with its figures from the view."""
    by_type = {r.expectation_config.type: r for r in vr.results}
    windows, max_err, mean_err, late, dup, lost, incomplete, impossible, truth_events, sketch = figures
    tolerance_result = by_type["expect_column_values_to_be_between"]
    return MetricAccuracy(
        metric=metric.name,
        success=bool(vr.success),
        windows=windows,
        missing=_observed(by_type["unexpected_rows_expectation"], "observed_value", metric.name),
        over_tolerance=_observed(tolerance_result, "unexpected_count", metric.name),
        max_error=max_err,
        mean_error=mean_err,
        tolerance=metric.tolerance,
        kind=metric.kind,
        late_events=int(late),
        duplicate_events=int(dup),
        lost_events=int(lost),
        incomplete=int(incomplete),
        impossible=int(impossible),
        within_tolerance=bool(tolerance_result.success),
        truth_events=int(truth_events),
        sketch_effect=sketch,
        report_page=page,
    )


def _observed(r: ExpectationValidationResult, key: str, metric: str) -> int:
    """A count from an expectation's result; an expectation GX could not evaluate is an error, not a FAIL."""
    if key in r.result:
        return int(r.result[key] or 0)  # None: the metric has no row that day, so nothing is unexpected
    info = r.exception_info
    messages = (
        [info["exception_message"]]
        if "exception_message" in info
        else [getattr(v, "exception_message", str(v)) for v in info.values()]
    )
    raise BatchmarkError(f"GX could not evaluate {r.expectation_config.type} for {metric}: {'; '.join(messages)}")


HISTORY_COLUMNS = [f.name for f in dataclasses.fields(MetricAccuracy)]  # each one a quality.accuracy_history column


def _record(url: str, report: ValidationReport) -> None:
    """Append one quality.accuracy_history row per metric, in one transaction."""
    report_url = report.docs_index.as_uri()
    with storage.transaction(url) as cur:
        psycopg2.extras.execute_values(
            cur,
            f"""INSERT INTO quality.accuracy_history (run_id, day, {", ".join(HISTORY_COLUMNS)}, report_url)
                VALUES %s""",
            [(report.run_id, report.day, *dataclasses.astuple(m), report_url) for m in report.metrics],
        )
