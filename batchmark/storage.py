"""Postgres: the schema (stream results, batch truth, quality history) and the writers of each.

Schemas: ``stream`` (written by the Faust worker), ``truth`` (written by the Spark job), ``quality``
(written by the validation). Every write is idempotent: stream rows are upserted by window identity, and a
day of batch truth is replaced in one transaction, so readers see the old day or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import date
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from batchmark.errors import ServiceUnavailable
from batchmark.windows import Calendar, ms_to_datetime

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS stream;
CREATE SCHEMA IF NOT EXISTS truth;
CREATE SCHEMA IF NOT EXISTS quality;

CREATE TABLE IF NOT EXISTS stream.results (
    metric        text             NOT NULL,
    group_key     text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    day           date             NOT NULL,
    value         double precision,
    n_events      bigint           NOT NULL,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (metric, group_key, window_start)
);
CREATE INDEX IF NOT EXISTS stream_results_day ON stream.results (day, metric);

-- Late records per window and partition, counted within the partition's current epoch: a replay after a
-- broker reset (a new epoch) replaces the count instead of adding to it.
CREATE TABLE IF NOT EXISTS stream.late_events (
    metric        text        NOT NULL,
    window_start  timestamptz NOT NULL,
    partition     integer     NOT NULL,
    epoch         text        NOT NULL,
    day           date        NOT NULL,
    n_late        bigint      NOT NULL,
    PRIMARY KEY (metric, window_start, partition)
);

-- Records the stream dead-lettered, per day (of the record's timestamp), reason and partition; counted in the
-- checkpoint's transaction, within the partition's epoch like late_events.
CREATE TABLE IF NOT EXISTS stream.rejections (
    topic      text    NOT NULL,
    day        date    NOT NULL,
    reason     text    NOT NULL,
    partition  integer NOT NULL,
    epoch      text    NOT NULL,
    records    bigint  NOT NULL,
    PRIMARY KEY (topic, day, reason, partition)
);

-- Records sent back from the dead-letter topic by `batchmark dlq --redrive`: each (by its source position) once.
CREATE TABLE IF NOT EXISTS stream.redriven (
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    dlq_topic         text        NOT NULL,
    dlq_partition     integer     NOT NULL,
    dlq_offset        bigint      NOT NULL,
    event_id          text        NOT NULL,
    redriven_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

-- Which metrics the batch recompute produced truth for, per day: a metric with no window that day (an empty
-- day, or a metric whose records were all null or outside its where) was still recomputed.
CREATE TABLE IF NOT EXISTS truth.recomputed (
    day            date        NOT NULL,
    metric         text        NOT NULL,
    run_id         text        NOT NULL,
    windows        bigint      NOT NULL,
    recomputed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, metric)
);

CREATE TABLE IF NOT EXISTS truth.results (
    metric        text             NOT NULL,
    group_key     text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    day           date             NOT NULL,
    value         double precision,
    n_events      bigint           NOT NULL,
    run_id        text             NOT NULL,
    computed_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (metric, group_key, window_start)
);
CREATE INDEX IF NOT EXISTS truth_results_day ON truth.results (day, metric);

CREATE TABLE IF NOT EXISTS quality.metrics (
    metric     text PRIMARY KEY,
    kind       text NOT NULL,
    tolerance  double precision NOT NULL
);
ALTER TABLE quality.metrics ADD COLUMN IF NOT EXISTS mostly double precision NOT NULL DEFAULT 1.0;
ALTER TABLE stream.results ADD COLUMN IF NOT EXISTS detail jsonb;
ALTER TABLE truth.results ADD COLUMN IF NOT EXISTS detail jsonb;

-- Per batch-truth window: the kind's accuracy measure and where the stream's difference comes from.
-- Written by the Spark job with the day's truth (same transaction): only it has the raw events.
-- stream - truth = lost_effect + dup_effect + late_effect + sketch_effect (each a difference of values).
CREATE TABLE IF NOT EXISTS quality.window_accuracy (
    metric         text             NOT NULL,
    group_key      text             NOT NULL,
    window_start   timestamptz      NOT NULL,
    day            date             NOT NULL,
    stream_value   double precision,
    error          double precision,
    n_lost         bigint           NOT NULL,
    n_dup          bigint           NOT NULL,
    n_late         bigint           NOT NULL,
    lost_effect    double precision,
    dup_effect     double precision,
    late_effect    double precision,
    sketch_effect  double precision,
    detail         jsonb,
    PRIMARY KEY (metric, group_key, window_start)
);
CREATE INDEX IF NOT EXISTS window_accuracy_day ON quality.window_accuracy (day, metric);

-- A recompute's rows while Spark's executors write them, tagged with the run; the driver then swaps them into
-- truth.results and quality.window_accuracy in one transaction and deletes them. Unlogged: a crash loses
-- only a run that is retried whole.
CREATE UNLOGGED TABLE IF NOT EXISTS truth.staging (
    run_id           text             NOT NULL,
    metric           text             NOT NULL,
    group_key        text             NOT NULL,
    window_start_ms  bigint           NOT NULL,
    window_end_ms    bigint           NOT NULL,
    value            double precision,
    n_events         bigint           NOT NULL,
    detail           text,
    stream_value     double precision,
    error            double precision,
    n_lost           bigint           NOT NULL,
    n_dup            bigint           NOT NULL,
    n_late           bigint           NOT NULL,
    lost_effect      double precision,
    dup_effect       double precision,
    late_effect      double precision,
    sketch_effect    double precision,
    accuracy_detail  text
);
CREATE INDEX IF NOT EXISTS truth_staging_run ON truth.staging (run_id);

CREATE TABLE IF NOT EXISTS quality.accuracy_history (
    id          bigserial PRIMARY KEY,
    run_id      text        NOT NULL,
    day         date        NOT NULL,
    metric      text        NOT NULL,
    success     boolean     NOT NULL,
    windows     bigint      NOT NULL,
    missing     bigint      NOT NULL,
    over_tolerance bigint   NOT NULL,
    max_error   double precision,
    mean_error  double precision,
    tolerance   double precision NOT NULL,
    report_url  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT '';
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS late_events bigint NOT NULL DEFAULT 0;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS duplicate_events bigint NOT NULL DEFAULT 0;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS lost_events bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS accuracy_history_day ON quality.accuracy_history (day, metric);
-- What the drift checks read besides the error (batchmark.drift): windows the stream did not complete, bin
-- packings below what the truth's items allow, the GX tolerance expectation alone, the truth's events, and
-- the metric's validation page (relative to the Data Docs root, so the report link follows configuration).
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS incomplete bigint NOT NULL DEFAULT 0;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS impossible bigint NOT NULL DEFAULT 0;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS within_tolerance boolean;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS truth_events bigint NOT NULL DEFAULT 0;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS sketch_effect double precision;
ALTER TABLE quality.accuracy_history ADD COLUMN IF NOT EXISTS report_page text;

-- Records the recompute rejected for a day, by reason (the lake's under changed rules, the archive's
-- malformed ones: what the stream dead-lettered). Replaced with the day's truth.
CREATE TABLE IF NOT EXISTS quality.rejections (
    day      date   NOT NULL,
    source   text   NOT NULL,
    reason   text   NOT NULL,
    records  bigint NOT NULL,
    PRIMARY KEY (day, source, reason)
);

-- Alerts: one row per change of a (metric, check) state on a day (batchmark.alerts), and per channel its
-- delivery (an outbox: pending rows are retried with backoff until delivered; delivered ones never again).
CREATE TABLE IF NOT EXISTS quality.alerts (
    id            bigserial PRIMARY KEY,
    day           date        NOT NULL,
    metric        text        NOT NULL,
    check_name    text        NOT NULL,
    severity      text        NOT NULL,   -- warning, error, recovered
    state_before  text        NOT NULL,
    state_after   text        NOT NULL,
    observed      double precision,
    baseline      double precision,
    threshold     double precision,
    title         text        NOT NULL,
    message       text        NOT NULL,
    report_url    text,
    suppressed    boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- a state that changes back and forth on one re-validated day is recorded each time (state, not day, is the key)
ALTER TABLE quality.alerts DROP CONSTRAINT IF EXISTS alerts_metric_check_name_day_state_after_key;
-- a recovery soon after the alert it ends is held until this day: if the state changes back meanwhile, the
-- recovery is superseded and the repeated alert is not announced again (flapping)
ALTER TABLE quality.alerts ADD COLUMN IF NOT EXISTS hold_until date;
CREATE INDEX IF NOT EXISTS alerts_metric_check ON quality.alerts (metric, check_name, day, id);
CREATE TABLE IF NOT EXISTS quality.alert_deliveries (
    alert_id        bigint      NOT NULL REFERENCES quality.alerts (id) ON DELETE CASCADE,
    channel         text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',   -- pending, sending, delivered, superseded
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (alert_id, channel)
);

-- The windows a worker holds open right now, with their provisional values: refreshed every few seconds in
-- the checkpoint's transaction (replaced per partition; a window leaves when its final row is written to
-- stream.results). What the live view shows; never used as a result.
CREATE TABLE IF NOT EXISTS stream.open_windows (
    topic         text             NOT NULL,
    partition     integer          NOT NULL,
    metric        text             NOT NULL,
    group_key     text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    value         double precision,
    n_events      bigint           NOT NULL,
    watermark_ms  bigint           NOT NULL,
    updated_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, metric, group_key, window_start)
);

CREATE TABLE IF NOT EXISTS stream.checkpoints (
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    resume_offset bigint      NOT NULL,
    next_offset   bigint      NOT NULL,
    watermark_ms  bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
ALTER TABLE stream.checkpoints ADD COLUMN IF NOT EXISTS epoch text NOT NULL DEFAULT '';

CREATE TABLE IF NOT EXISTS quality.task_failures (
    id         bigserial PRIMARY KEY,
    dag_id     text NOT NULL,
    task_id    text NOT NULL,
    run_id     text NOT NULL,
    day        text,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per batch-truth window, with the stream's value beside it (NULL when the stream has no row) and
-- the kind's accuracy error. Where the error needs the raw events (quantile rank error, top-k recall) it
-- comes from window_accuracy, and only while the stream value is the one it was computed for.
DROP VIEW IF EXISTS quality.alert_status;
CREATE VIEW quality.alert_status AS
SELECT a.id, a.day, a.metric, a.check_name, a.severity, a.observed, a.baseline, a.threshold, a.message,
       a.report_url, a.created_at,
       coalesce(array_agg(d.channel ORDER BY d.channel) FILTER (WHERE d.status = 'delivered'), '{}') AS delivered_to,
       CASE WHEN a.suppressed THEN 'suppressed'
            WHEN count(d.channel) = 0 THEN 'no channel'
            WHEN bool_and(d.status = 'delivered') THEN 'delivered'
            WHEN bool_and(d.status IN ('delivered', 'superseded')) THEN 'superseded'
            ELSE 'pending' END AS delivery_status,
       max(d.last_error) FILTER (WHERE d.status <> 'delivered') AS last_error
FROM quality.alerts a LEFT JOIN quality.alert_deliveries d ON d.alert_id = a.id
GROUP BY a.id;
-- Every rejected record count in one place: the stream's dead letters (per events topic) and what the recompute
-- refused (the archive's malformed records: the same records as the stream's; landed records newer rules refuse).
DROP VIEW IF EXISTS quality.rejected_records;
CREATE VIEW quality.rejected_records AS
SELECT day, 'stream'::text AS source, topic, reason, sum(records)::bigint AS records
FROM stream.rejections GROUP BY day, topic, reason
UNION ALL
SELECT day, source, NULL::text AS topic, reason, records FROM quality.rejections;
-- The Kappa comparison (batchmark.kappa): versions of the streaming app replayed on one stored source. Each
-- version's results under its label beside production's stream.results; each window judged against the truth;
-- one row per metric (candidate against stable); the run with its verdict line.
CREATE TABLE IF NOT EXISTS stream.version_results (
    run_id        text             NOT NULL,
    label         text             NOT NULL,
    metric        text             NOT NULL,
    group_key     text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    window_end    timestamptz      NOT NULL,
    day           date             NOT NULL,
    value         double precision,
    n_events      bigint           NOT NULL,
    detail        jsonb,
    PRIMARY KEY (run_id, label, metric, group_key, window_start)
);
CREATE TABLE IF NOT EXISTS quality.version_runs (
    run_id       text PRIMARY KEY,
    source       text        NOT NULL,
    stable       text        NOT NULL,
    candidate    text        NOT NULL,
    topic        text        NOT NULL,
    status       text        NOT NULL,  -- running, done, failed
    verdict      text,                  -- the verdict line, or why it failed
    events       bigint,
    comparison   jsonb,                 -- everything compare-versions printed, as JSON
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz
);
CREATE TABLE IF NOT EXISTS quality.version_windows (
    run_id        text             NOT NULL,
    label         text             NOT NULL,
    metric        text             NOT NULL,
    group_key     text             NOT NULL,
    window_start  timestamptz      NOT NULL,
    truth_value   double precision,
    stream_value  double precision,
    error         double precision,
    n_lost        bigint           NOT NULL,
    n_dup         bigint           NOT NULL,
    n_late        bigint           NOT NULL,
    sketch_effect double precision,
    PRIMARY KEY (run_id, label, metric, group_key, window_start)
);
CREATE TABLE IF NOT EXISTS quality.version_comparison (
    run_id               text             NOT NULL,
    metric               text             NOT NULL,
    kind                 text             NOT NULL,
    windows              bigint           NOT NULL,  -- judged in both versions (the sign test's pairs)
    stable_max_error     double precision,
    stable_mean_error    double precision,
    candidate_max_error  double precision,
    candidate_mean_error double precision,
    worse_windows        bigint           NOT NULL,  -- windows where the candidate's error is larger
    better_windows       bigint           NOT NULL,
    same_windows         bigint           NOT NULL,
    p_value              double precision NOT NULL,  -- two-sided exact sign test
    verdict              text             NOT NULL,  -- better, same, worse (p < 0.05)
    cause                text             NOT NULL,  -- the attribution that moved most
    figures              jsonb            NOT NULL,  -- each version's max/mean error, share within tolerance, causes
    PRIMARY KEY (run_id, metric)
);

-- The Lambda serving view: the table to read results from. Per metric, window and group: the batch truth
-- where the metric's day has been recomputed and validated, the stream's value elsewhere (today, or a day
-- whose nightly run has not validated yet), with where the value came from and when it was computed.
CREATE SCHEMA IF NOT EXISTS serving;
DROP VIEW IF EXISTS serving.results;
CREATE VIEW serving.results AS
WITH validated AS (SELECT DISTINCT metric, day FROM quality.accuracy_history)
SELECT t.metric, t.group_key, t.window_start, t.window_end, t.day, t.value, t.n_events,
       'truth'::text AS source, t.computed_at AS value_time
FROM truth.results t JOIN validated v ON v.metric = t.metric AND v.day = t.day
UNION ALL
SELECT s.metric, s.group_key, s.window_start, s.window_end, s.day, s.value, s.n_events,
       'stream'::text AS source, s.updated_at AS value_time
FROM stream.results s
WHERE NOT EXISTS (SELECT 1 FROM validated v WHERE v.metric = s.metric AND v.day = s.day);
DROP VIEW IF EXISTS quality.comparison;
CREATE VIEW quality.comparison AS
SELECT t.day, t.metric, t.group_key, t.window_start,
       t.value AS batch_value, s.value AS stream_value,
       t.n_events AS batch_events, s.n_events AS stream_events,
       q.kind, q.tolerance, q.mostly,
       {error_case} AS error,
       a.n_lost, a.n_dup, a.n_late, a.lost_effect, a.dup_effect, a.late_effect, a.sketch_effect
FROM truth.results t
LEFT JOIN stream.results s USING (metric, group_key, window_start)
LEFT JOIN quality.metrics q USING (metric)
LEFT JOIN quality.window_accuracy a USING (metric, group_key, window_start);
"""


UPGRADE_SQL = """
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'quality'
             AND table_name = 'accuracy_history' AND column_name = 'max_rel_error') THEN
    ALTER TABLE quality.accuracy_history RENAME COLUMN max_rel_error TO max_error;
    ALTER TABLE quality.accuracy_history RENAME COLUMN mean_rel_error TO mean_error;
  END IF;
  IF EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = 'stream' AND table_name = 'late_events')
     AND NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'stream'
                     AND table_name = 'late_events' AND column_name = 'epoch') THEN
    DROP TABLE stream.late_events;  -- the old layout; the counts come back with the next replay
  END IF;
END $$;
"""


def server_url(url: str, dbname: str = "postgres") -> str:
    """The same server, another database (used to create ours)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


def connect(url: str) -> psycopg2.extensions.connection:
    """Open a connection, or say plainly which server could not be reached and how to point elsewhere."""
    try:
        return psycopg2.connect(url, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        safe = urlsplit(url)._replace(netloc=urlsplit(url).hostname or "").geturl()
        raise ServiceUnavailable(
            f"cannot reach PostgreSQL at {safe}: {str(exc).strip().splitlines()[0]}. "
            "Start it, or set DATABASE_URL to one that runs."
        ) from None


@contextlib.contextmanager
def transaction(url: str) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor inside one transaction: committed on success, rolled back on any error."""
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def drop_database(url: str) -> None:
    """Drop the database named in url (gone already is fine), ending its sessions first."""
    from psycopg2 import sql

    conn = connect(server_url(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db_name(url),))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db_name(url))))
    finally:
        conn.close()


def ensure_database(url: str) -> None:
    """Create the database named in url if it does not exist, then the schema."""
    create_database(url)
    init_schema(url)


def create_database(url: str) -> None:
    """Create the database named in url if it does not exist (nothing in it)."""
    name = db_name(url)
    conn = connect(server_url(url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def schema_sql() -> str:
    """The schema's DDL; quality.comparison's error column is each kind's own SQL (aggregates.error_case_sql)."""
    from batchmark.aggregates import error_case_sql

    return SCHEMA_SQL.replace("{error_case}", error_case_sql())


def init_schema(url: str) -> None:
    """Create the tables and views (idempotent).

    A least-privilege role (see batchmark.access) may not run DDL: when the schema is already in place it
    goes on without it; when it is not, it says who has to create it.
    """
    try:
        with transaction(url) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(4242)")  # two processes may init at once
            cur.execute(UPGRADE_SQL)
            cur.execute(schema_sql())
    except psycopg2.errors.InsufficientPrivilege as exc:
        with transaction(url) as cur:
            cur.execute(  # ask the catalog, readable by every role (to_regclass needs USAGE on the schema)
                "SELECT count(*) = 5 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
                " ON n.oid = c.relnamespace"
                " WHERE (n.nspname, c.relname) IN (('stream', 'checkpoints'), ('quality', 'task_failures'),"
                " ('stream', 'open_windows'), ('quality', 'alerts'), ('truth', 'recomputed'))"  # the newest tables
            )
            ready = cur.fetchone()[0]
        if not ready:
            raise ServiceUnavailable(
                f"the batchmark schema is not in {db_name(url)} and this role may not create it ({exc.pgerror}). "
                "Run `batchmark init-db` with the database owner's DATABASE_URL first."
            ) from None


def _json(detail: Any) -> psycopg2.extras.Json | None:
    return None if detail is None else psycopg2.extras.Json(detail)


def _row(r: Any, day_of: Any) -> tuple[Any, ...]:
    start = ms_to_datetime(r.window_start_ms)
    return (
        r.metric,
        r.group_key,
        start,
        ms_to_datetime(r.window_end_ms),
        day_of(r.window_start_ms),
        r.value,
        r.n_events,
        _json(r.detail),
    )


def upsert_stream_results(cur: psycopg2.extensions.cursor, results: Sequence[Any], calendar: Any = None) -> int:
    """Write closed windows; a window written again (a replay) replaces its row instead of adding to it. A
    window's day is the day its start falls in, in the dataset's calendar (UTC without one)."""
    if not results:
        return 0
    day_of = (calendar or Calendar()).day_of
    psycopg2.extras.execute_values(
        cur,
        """INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events, detail)
           VALUES %s
           ON CONFLICT (metric, group_key, window_start)
           DO UPDATE SET value = EXCLUDED.value, n_events = EXCLUDED.n_events, detail = EXCLUDED.detail,
                         updated_at = now()""",
        [_row(r, day_of) for r in results],
        page_size=1000,
    )
    return len(results)


def add_late_events(
    cur: psycopg2.extensions.cursor,
    partition: int,
    epoch: str,
    late: Iterable[tuple[str, int, int]],
    calendar: Any = None,
) -> None:
    """Record (metric, window_start_ms, n) records of one partition that came after their window closed."""
    day_of = (calendar or Calendar()).day_of
    rows = [(m, ms_to_datetime(s), partition, epoch, day_of(s), n) for m, s, n in late]
    if rows:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO stream.late_events (metric, window_start, partition, epoch, day, n_late) VALUES %s
               ON CONFLICT (metric, window_start, partition) DO UPDATE SET
                 n_late = CASE WHEN stream.late_events.epoch = EXCLUDED.epoch
                               THEN stream.late_events.n_late + EXCLUDED.n_late ELSE EXCLUDED.n_late END,
                 epoch = EXCLUDED.epoch""",
            rows,
        )


def add_stream_rejections(
    cur: psycopg2.extensions.cursor, topic: str, partition: int, epoch: str, counts: dict[tuple[Any, str], int]
) -> None:
    """Add one partition's dead-letter counts ({(day, reason): records}) to stream.rejections."""
    rows = [(topic, day, reason, partition, epoch, n) for (day, reason), n in counts.items() if n]
    if rows:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO stream.rejections (topic, day, reason, partition, epoch, records) VALUES %s
               ON CONFLICT (topic, day, reason, partition) DO UPDATE SET
                 records = CASE WHEN stream.rejections.epoch = EXCLUDED.epoch
                                THEN stream.rejections.records + EXCLUDED.records ELSE EXCLUDED.records END,
                 epoch = EXCLUDED.epoch""",
            rows,
        )


def rejected_once(totals: dict[str, int]) -> int:
    """Records rejected, each once, from the totals per source: the stream's dead letters and the archive's
    malformed records are the same records seen twice (either may be missing), so the larger of the two counts;
    the lake's (records the stream accepted, refused by newer rules) are added."""
    return max(totals.get("stream", 0), totals.get("archive", 0)) + totals.get("lake", 0)


def rejected_per_day(cur: psycopg2.extensions.cursor, topic: str, until: date) -> dict[date, int]:
    """{day: records rejected, each once (rejected_once)} up to `until`, for the dataset whose events topic is
    `topic`."""
    cur.execute(
        """SELECT day, 'stream', sum(records) FROM stream.rejections WHERE topic = %s AND day <= %s GROUP BY day
           UNION ALL
           SELECT day, source, sum(records) FROM quality.rejections WHERE day <= %s GROUP BY day, source""",
        (topic, until, until),
    )
    totals: dict[date, dict[str, int]] = {}
    for day, source, n in cur.fetchall():
        totals.setdefault(day, {})[source] = int(n)
    return {day: rejected_once(by_source) for day, by_source in totals.items()}


def day_rejections(cur: psycopg2.extensions.cursor, day: date, topic: str) -> dict[str, dict[str, int]]:
    """{source: {reason: records}} of a day: 'stream' (what the worker dead-lettered on `topic`), and what the
    recompute rejected ('archive': the source's malformed records; 'lake': landed records failing the rules)."""
    out: dict[str, dict[str, int]] = {}
    cur.execute(
        "SELECT reason, sum(records) FROM stream.rejections WHERE day = %s AND topic = %s GROUP BY reason",
        (day, topic),
    )
    for reason, n in cur.fetchall():
        out.setdefault("stream", {})[reason] = int(n)
    cur.execute("SELECT source, reason, records FROM quality.rejections WHERE day = %s", (day,))
    for source, reason, n in cur.fetchall():
        out.setdefault(source, {})[reason] = int(n)
    return out


def replace_truth_day(
    url: str,
    day: date,
    metrics: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    run_id: str,
    accuracy: Sequence[tuple[Any, ...]] = (),
) -> int:
    """Replace one day of batch truth (and its per-window accuracy) for the given metrics, atomically.

    rows: (metric, group_key, window_start_ms, window_end_ms, value, n_events, detail).
    accuracy: (metric, group_key, window_start_ms, stream_value, error, n_lost, n_dup, n_late,
               lost_effect, dup_effect, late_effect, sketch_effect, detail).
    """
    with transaction(url) as cur:
        cur.execute("DELETE FROM truth.results WHERE day = %s AND metric = ANY(%s)", (day, list(metrics)))
        cur.execute("DELETE FROM quality.window_accuracy WHERE day = %s AND metric = ANY(%s)", (day, list(metrics)))
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO truth.results (metric, group_key, window_start, window_end, day, value, n_events,
                                          detail, run_id) VALUES %s""",
            [(m, g, ms_to_datetime(s), ms_to_datetime(e), day, v, n, _json(d), run_id) for m, g, s, e, v, n, d in rows],
            page_size=5000,
        )
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO quality.window_accuracy (metric, group_key, window_start, day, stream_value, error,
                   n_lost, n_dup, n_late, lost_effect, dup_effect, late_effect, sketch_effect, detail) VALUES %s""",
            [(r[0], r[1], ms_to_datetime(r[2]), day, *r[3:12], _json(r[12])) for r in accuracy],
            page_size=5000,
        )
        _mark_recomputed(cur, day, metrics, run_id)
    return len(rows)


def _mark_recomputed(cur: psycopg2.extensions.cursor, day: date, metrics: Sequence[str], run_id: str) -> None:
    """Record, in the swap's transaction, that these metrics' truth of `day` is now the run's (truth.recomputed)."""
    cur.execute(
        """INSERT INTO truth.recomputed (day, metric, run_id, windows)
           SELECT %s, m, %s, (SELECT count(*) FROM truth.results t WHERE t.day = %s AND t.metric = m)
           FROM unnest(%s::text[]) AS m
           ON CONFLICT (day, metric) DO UPDATE SET run_id = EXCLUDED.run_id, windows = EXCLUDED.windows,
                                                   recomputed_at = now()""",
        (day, run_id, day, list(metrics)),
    )


def recomputed_metrics(cur: psycopg2.extensions.cursor, day: date) -> dict[str, int]:
    """{metric: windows} of the metrics the batch recompute produced truth for on `day`."""
    cur.execute("SELECT metric, windows FROM truth.recomputed WHERE day = %s", (day,))
    return {m: int(n) for m, n in cur.fetchall()}


STAGING_COLUMNS = (
    "run_id", "metric", "group_key", "window_start_ms", "window_end_ms", "value", "n_events", "detail",
    "stream_value", "error", "n_lost", "n_dup", "n_late", "lost_effect", "dup_effect", "late_effect",
    "sketch_effect", "accuracy_detail",
)  # fmt: skip


def copy_to_staging(url: str, csv_text: Any) -> None:
    """COPY rows (CSV in STAGING_COLUMNS order, NULL as \\N) into truth.staging: what each Spark executor does."""
    with transaction(url) as cur:
        cur.copy_expert(
            f"COPY truth.staging ({', '.join(STAGING_COLUMNS)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", csv_text
        )


def swap_truth_day(
    url: str, day: date, metrics: Sequence[str], run_id: str, rejected: dict[str, dict[str, int]] | None = None
) -> int:
    """Replace one day of truth and per-window accuracy with a run's staged rows, in one transaction; returns
    the rows. Readers see the old day or the new one, never a mix; the staged rows are gone afterwards.
    `rejected` ({source: {reason: records}}) replaces the day's rows of quality.rejections in that transaction."""
    epoch = "timestamptz 'epoch' + {} * interval '1 millisecond'"
    with transaction(url) as cur:
        cur.execute("DELETE FROM quality.rejections WHERE day = %s", (day,))
        for source, reasons in (rejected or {}).items():
            for reason, n in reasons.items():
                if n:
                    cur.execute(
                        "INSERT INTO quality.rejections (day, source, reason, records) VALUES (%s, %s, %s, %s)",
                        (day, source, reason, int(n)),
                    )
        cur.execute("DELETE FROM truth.results WHERE day = %s AND metric = ANY(%s)", (day, list(metrics)))
        cur.execute("DELETE FROM quality.window_accuracy WHERE day = %s AND metric = ANY(%s)", (day, list(metrics)))
        cur.execute(
            f"""INSERT INTO truth.results (metric, group_key, window_start, window_end, day, value, n_events, detail,
                                           run_id)
                SELECT metric, group_key, {epoch.format("window_start_ms")}, {epoch.format("window_end_ms")}, %s,
                       value, n_events, detail::jsonb, run_id
                FROM truth.staging WHERE run_id = %s""",
            (day, run_id),
        )
        rows = cur.rowcount
        cur.execute(
            f"""INSERT INTO quality.window_accuracy (metric, group_key, window_start, day, stream_value, error,
                   n_lost, n_dup, n_late, lost_effect, dup_effect, late_effect, sketch_effect, detail)
                SELECT metric, group_key, {epoch.format("window_start_ms")}, %s, stream_value, error, n_lost, n_dup,
                       n_late, lost_effect, dup_effect, late_effect, sketch_effect, accuracy_detail::jsonb
                FROM truth.staging WHERE run_id = %s""",
            (day, run_id),
        )
        cur.execute("DELETE FROM truth.staging WHERE run_id = %s", (run_id,))
        _mark_recomputed(cur, day, metrics, run_id)
    return rows


def replace_open_windows(cur: Any, topic: str, partition: int, rows: Sequence[Any], watermark_ms: int) -> None:
    """Replace a partition's rows of stream.open_windows with these provisional WindowResults."""
    cur.execute("DELETE FROM stream.open_windows WHERE topic = %s AND partition = %s", (topic, partition))
    upsert_open_windows(cur, topic, partition, rows, watermark_ms)


def upsert_open_windows(cur: Any, topic: str, partition: int, rows: Sequence[Any], watermark_ms: int) -> None:
    """Insert (or update) provisional WindowResults in stream.open_windows."""
    if rows:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO stream.open_windows (topic, partition, metric, group_key, window_start, window_end, value,
                   n_events, watermark_ms) VALUES %s
               ON CONFLICT (topic, partition, metric, group_key, window_start) DO UPDATE SET
                   value = EXCLUDED.value, n_events = EXCLUDED.n_events, watermark_ms = EXCLUDED.watermark_ms,
                   updated_at = now()""",
            [
                (
                    topic,
                    partition,
                    r.metric,
                    r.group_key,
                    ms_to_datetime(r.window_start_ms),
                    ms_to_datetime(r.window_end_ms),
                    r.value,
                    r.n_events,
                    watermark_ms,
                )
                for r in rows
            ],  # fmt: skip
            page_size=5000,
        )


def drop_open_windows(cur: Any, topic: str, partition: int, closed: Sequence[Any]) -> None:
    """Remove closed windows (WindowResults whose final rows are being written) from stream.open_windows."""
    if closed:
        cur.execute(
            """DELETE FROM stream.open_windows WHERE topic = %s AND partition = %s
                 AND (metric, group_key, window_start) IN (SELECT * FROM unnest(%s::text[], %s::text[],
                                                                               %s::timestamptz[]))""",
            (
                topic,
                partition,
                [r.metric for r in closed],
                [r.group_key for r in closed],
                [ms_to_datetime(r.window_start_ms) for r in closed],
            ),
        )


def clear_staging(url: str, run_id: str) -> None:
    """Drop what a run staged (after a failure; a swapped run has nothing left there)."""
    with transaction(url) as cur:
        cur.execute("DELETE FROM truth.staging WHERE run_id = %s", (run_id,))


def fetch_results(url: str, table: str, day: date) -> dict[tuple[str, str, Any], tuple[float, int]]:
    """{(metric, group_key, window_start): (value, n_events)} of one day from 'stream' or 'truth'."""
    if table not in ("stream", "truth"):
        raise ValueError(table)
    with transaction(url) as cur:
        cur.execute(
            sql.SQL("SELECT metric, group_key, window_start, value, n_events FROM {}.results WHERE day = %s").format(
                sql.Identifier(table)
            ),
            (day,),
        )
        return {(m, g, w): (v, n) for m, g, w, v, n in cur.fetchall()}


def read_checkpoint(url: str, topic: str, partition: int) -> tuple[int, int, int, str] | None:
    """(resume_offset, next_offset, watermark_ms, epoch) stored for a partition, or None."""
    with transaction(url) as cur:
        cur.execute(
            "SELECT resume_offset, next_offset, watermark_ms, epoch FROM stream.checkpoints "
            "WHERE topic = %s AND partition = %s",
            (topic, partition),
        )
        row = cur.fetchone()
    return tuple(row) if row else None  # type: ignore[return-value]


def write_checkpoint(
    cur: psycopg2.extensions.cursor,
    topic: str,
    partition: int,
    resume_offset: int,
    next_offset: int,
    watermark_ms: int,
    epoch: str,
) -> None:
    cur.execute(
        """INSERT INTO stream.checkpoints (topic, partition, resume_offset, next_offset, watermark_ms, epoch)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (topic, partition) DO UPDATE SET resume_offset = EXCLUDED.resume_offset,
             next_offset = EXCLUDED.next_offset, watermark_ms = EXCLUDED.watermark_ms, epoch = EXCLUDED.epoch,
             updated_at = now()""",
        (topic, partition, resume_offset, next_offset, watermark_ms, epoch),
    )


def record_task_failure(url: str, dag_id: str, task_id: str, run_id: str, day: str | None, error: str) -> None:
    """Keep a row per failed Airflow task (the DAG's failure callback)."""
    with transaction(url) as cur:
        cur.execute(
            "INSERT INTO quality.task_failures (dag_id, task_id, run_id, day, error) VALUES (%s, %s, %s, %s, %s)",
            (dag_id, task_id, run_id, day, error),
        )
