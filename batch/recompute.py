"""Nightly recompute: one day of the lake (and optionally the archive) -> exact metrics -> batch truth.

    spark-submit --master local[*] batch/recompute.py --date 2026-11-24 [--archive events.jsonl] [--run-id ID]
    (or: batchmark recompute --date 2026-11-24 [--archive events.jsonl])

One Spark job, and nothing proportional to the day passes through the driver:
1. read date=<day>/ of the lake (every valid record the stream landed, with the watermark it met) and apply
   the stream's validation rules as Spark expressions derived from the definitions (rules may have changed);
2. one shuffle by event id: drop records landed twice (same epoch, partition and offset) and number the copies
   of an event id in arrival order; when an archive (the system of record: JSONL, read in byte ranges) is
   given, the same shuffle joins it, so events the stream never saw enter the truth;
3. the stream's values for the day are read by the executors from Postgres and cogrouped with the records by
   (plan, bucket of whole windows, shard of group keys); each group runs the core's vectorized
   ``window_accuracy`` (batchmark.batch_compute): truth, error and its attribution per window;
4. executors COPY the rows into a staging table; the driver then replaces the day's rows of truth.results and
   quality.window_accuracy from it in one transaction: readers see the old day or the new one, never a mix.
Counts (records read, rejected by reason, truth events) are observed during that one pass. A day with no lake
partition is certified empty (no window for any metric) once every stream partition's watermark has passed its
end plus the lateness; before that it is refused. Prints one line ``BATCHMARK_RESULT {json}``; ``--stages``
also times the job's prefixes (read, validate, dedupe, aggregate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import date
from pathlib import Path

from batchmark import config, storage
from batchmark.batch_compute import (
    NO_WATERMARK,
    OUTPUT_SCHEMA,
    REJECT_COLUMN,
    bucket_ms,
    cached_definitions,
    line_ranges,
    read_line_range,
    window_accuracy,
)
from batchmark.definitions import Dataset, Definitions, load_definitions
from batchmark.events import REASONS
from batchmark.lake import day_dir
from batchmark.spark import RESULT_PREFIX
from batchmark.windows import parse_day

SPARK_TYPES = {"string": "string", "float": "double", "int": "bigint"}


def used_fields(defs: Definitions) -> set[str]:
    """The fields some metric reads (group keys, values): the only ones the job carries past the read."""
    import ast

    used = {k for m in defs.metrics for k in m.group_by}
    for m in defs.metrics:
        if m.value_expr:
            used |= {n.id for n in ast.walk(ast.parse(m.value_expr, mode="eval")) if isinstance(n, ast.Name)}
        if m.where_rule is not None:
            used.add(m.where_rule[0])
    return used


def rejection_column(ds: Dataset):  # noqa: ANN201 (a pyspark Column)
    """The reason code validate_record gives a typed lake row ('' when valid), as one Spark expression.

    The same rules in the same order as batchmark.events.validate_record, for rows that are already typed (a
    lake file's columns); tests/test_recompute.py holds the two to the same answers.
    """
    from pyspark.sql import functions as F

    def too_long(c, limit: int):  # noqa: ANN001, ANN202
        # more characters than the limit; counting characters decodes UTF-8, so only texts with more bytes than
        # the limit are counted (a text has at least as many bytes as characters)
        return (F.octet_length(c) > limit) & (F.length(c) > limit)

    eid, ts = F.col("event_id"), F.col("event_time_ms")
    checks = [
        (eid.isNull(), "missing_field"),
        ((F.octet_length(eid) == 0) | too_long(eid, 128), "wrong_type"),
        (ts.isNull(), "missing_field"),
        ((ts < ds.min_event_time_ms) | (ts >= ds.max_event_time_ms), "out_of_range"),
    ]
    for f in ds.fields:
        c = F.col(f"`{f.name}`")
        if not f.nullable:  # a null passes the checks below (their comparisons are null, not true)
            checks.append((c.isNull(), "missing_field"))
        if f.type == "string":
            checks.append(((F.octet_length(c) == 0) | too_long(c, f.max_length), "out_of_range"))
            continue
        if f.type == "float":
            checks.append((F.isnan(c) | (F.abs(c) == float("inf")), "not_finite"))
        if f.min is not None:
            checks.append((c < f.min, "out_of_range"))
        if f.max is not None:
            checks.append((c > f.max, "out_of_range"))
    expr = F.lit("")
    for cond, reason in reversed(checks):
        expr = F.when(cond, F.lit(reason)).otherwise(expr)
    return expr


def _archive_fn(defs_path: str, start_ms: int, end_ms: int, batch_rows: int = 50_000):  # noqa: ANN202
    """Read byte ranges of the archive and validate each line with the core's rules: the day's valid events, and
    every rejection. Each input row is (path, start, end); output comes in frames of at most batch_rows."""

    def parse(batches):  # noqa: ANN001, ANN202
        import pandas as pd

        from batchmark.events import Rejection, validate

        d = cached_definitions(defs_path)
        names = ["event_id", "event_time_ms", *d.dataset.field_names]
        for ranges in batches:
            rows = []
            for path, start, end in zip(ranges["path"], ranges["start"], ranges["end"], strict=True):
                for line in read_line_range(path, int(start), int(end)):
                    ev = validate(line, d.dataset)
                    if isinstance(ev, Rejection):
                        rows.append([None] * len(names) + [ev.reason])
                    elif start_ms <= ev["event_time_ms"] < end_ms:
                        rows.append([ev[n] for n in names] + [""])
                    if len(rows) >= batch_rows:
                        yield pd.DataFrame(rows, columns=[*names, REJECT_COLUMN])
                        rows = []
            if rows:
                yield pd.DataFrame(rows, columns=[*names, REJECT_COLUMN])

    return parse


def _stream_fn(url: str, day: str):  # noqa: ANN202
    """An executor reads the stream's values of the day (the driver never holds them)."""

    def read(batches):  # noqa: ANN001, ANN202
        import pandas as pd

        from batchmark import storage as st

        for _ in batches:
            with st.transaction(url) as cur:
                cur.execute(
                    "SELECT metric, group_key, (extract(epoch FROM window_start) * 1000)::bigint, value, "
                    "detail::text FROM stream.results WHERE day = %s",
                    (day,),
                )
                rows = cur.fetchall()
            yield pd.DataFrame(rows, columns=["metric", "group_key", "window_start_ms", "value", "detail"])

    return read


def _windows_fn(defs_path: str, plans: list[list[str]], busy):  # noqa: ANN001, ANN202
    """The per-group function: the core's window_accuracy for the plan's metrics, against the stream's values.
    `busy` (an accumulator) adds up the seconds the workers spend in it."""

    def compute(key, records, stream):  # noqa: ANN001, ANN202
        t = time.monotonic()
        d = cached_definitions(defs_path)
        values = {
            (m, g, int(s)): (v, json.loads(det) if det else None)
            for m, g, s, v, det in stream[["metric", "group_key", "window_start_ms", "value", "detail"]].itertuples(
                index=False, name=None
            )
        }
        plan = plans[int(key[0]) % len(plans)]  # the group key is (bucket * shards + shard) * plans + plan
        out = window_accuracy(records, [d.metric(n) for n in plan], values, d.dataset.calendar)
        busy.add(time.monotonic() - t)
        return out

    return compute


def _writer_fn(url: str, run_id: str):  # noqa: ANN202
    """Executors COPY their result rows into truth.staging under the run's id; each task says how many."""

    def write(batches):  # noqa: ANN001, ANN202
        import io

        import pandas as pd

        from batchmark import storage as st

        rows = 0
        for pdf in batches:
            if pdf.empty:
                continue
            buf = io.StringIO()
            pdf.insert(0, "run_id", run_id)
            pdf.to_csv(buf, index=False, header=False, na_rep="\\N")  # unquoted \\N is NULL
            buf.seek(0)
            st.copy_to_staging(url, buf)
            rows += len(pdf)
        yield pd.DataFrame({"rows": [rows]})

    return write


def build(spark, defs: Definitions, defs_path: str, lake_path: Path, archive: str | None, day, url: str, shards: int):  # noqa: ANN001, ANN201, PLR0913
    """The day's job as DataFrames: (stages, observations, busy). stages maps each prefix of the job to a
    DataFrame (read, validate, dedupe, aggregate), the last one the per-window rows; observations are the
    counts observed during the pass (and the per-reason rejection query, run only when some were rejected);
    busy accumulates the seconds the Python workers spend in window_accuracy."""
    from pyspark.sql import Observation, Window
    from pyspark.sql import functions as F

    ds = defs.dataset
    fields = ["event_id", "event_time_ms", *[f for f in ds.field_names if f in used_fields(defs)]]
    columns = ["event_id string", "event_time_ms bigint"] + [f"`{f.name}` {SPARK_TYPES[f.type]}" for f in ds.fields]
    landing = ["_epoch string", "_partition int", "_offset bigint", "_watermark_ms bigint"]
    raw = spark.read.schema(", ".join(columns + landing)).parquet(str(lake_path))
    obs_lake = Observation("lake")
    obs_truth = Observation("truth")
    observations = {"lake": obs_lake, "truth": obs_truth}

    # 1. validate, then 2. one shuffle by event id: records landed twice (same landing) go, copies are numbered
    checked = (
        raw.withColumn(REJECT_COLUMN, rejection_column(ds))
        .select(*fields, "_epoch", "_partition", "_offset", "_watermark_ms", REJECT_COLUMN)
        .withColumn("_invalid", (F.col(REJECT_COLUMN) != "").cast("int"))
    )  # every field validated, only the used ones carried on; the reason only to the per-reason count below
    # Partitioned by (a 64-bit hash of the id, the id): the same groups as by the id alone, but the sort
    # compares longs first; ids often share long prefixes (dates, tenants) that make string sorts slow.
    checked = checked.withColumn("_h", F.xxhash64("event_id"))
    arrival = Window.partitionBy("_h", "event_id").orderBy(
        "_invalid", "_epoch", "_partition", "_offset"
    )  # valid records first: copies are numbered among them (a column, not an expression: 2x faster here)
    ranked = (
        checked.drop(REJECT_COLUMN)
        .withColumn("_n", F.row_number().over(arrival))
        .withColumn("_rank", F.rank().over(arrival))
        .withColumn("_copy", F.dense_rank().over(arrival) - 1)
        .where(F.col("_n") == F.col("_rank"))  # the first of equal landings
    )
    ranked = ranked.observe(obs_lake, F.count(F.lit(1)).alias("lake_records"), F.sum("_invalid").alias("rejected"))
    lake = ranked.where(F.col("_invalid") == 0).select("_h", *fields, "_watermark_ms", "_copy")
    if archive:
        start_ms, end_ms = ds.calendar.day_bounds_ms(day)
        obs_archive = Observation("archive")
        observations["archive"] = obs_archive
        ranges = line_ranges(archive)  # one task per ~32 MB, each read as raw bytes
        parsed = (
            spark.createDataFrame(
                spark.sparkContext.parallelize(ranges, len(ranges)), "path string, start bigint, `end` bigint"
            )
            .mapInPandas(_archive_fn(defs_path, start_ms, end_ms), ", ".join(columns) + f", {REJECT_COLUMN} string")
            .observe(obs_archive, *[F.sum(F.when(F.col(REJECT_COLUMN) == r, 1).otherwise(0)).alias(r) for r in REASONS])
        )
        archived = (
            parsed.where(F.col(REJECT_COLUMN) == "")
            .withColumn("_h", F.xxhash64("event_id"))
            .dropDuplicates(["_h", "event_id"])
            .select(F.col("_h").alias("_a_h"), *[F.col(f"`{c}`").alias(f"_a_{c}") for c in fields])
        )
        same = (lake["_h"] == archived["_a_h"]) & (lake["event_id"] == archived["_a_event_id"])
        joined = lake.join(archived, same, "full_outer")  # on the window's partitioning: no second shuffle
        in_lake = F.col("event_id").isNotNull()
        records = joined.select(
            *[F.when(in_lake, F.col(f"`{c}`")).otherwise(F.col(f"`_a_{c}`")).alias(c) for c in fields],
            in_lake.alias("_in_lake"),
            F.coalesce(F.col("_copy"), F.lit(0)).alias("_copy"),
            (~in_lake | ((F.col("_copy") == 0) & F.col("_a_event_id").isNotNull())).alias("_in_truth"),
            F.coalesce(F.col("_watermark_ms"), F.lit(NO_WATERMARK)).alias("_watermark_ms"),
        )
    else:
        records = lake.select(
            *fields, F.lit(True).alias("_in_lake"), "_copy", (F.col("_copy") == 0).alias("_in_truth"), "_watermark_ms"
        )
    records = records.observe(obs_truth, F.sum(F.col("_in_truth").cast("long")).alias("truth_events"))

    # 3. per plan (metrics with the same group keys): groups of whole windows, cogrouped with the stream's values
    plans: dict[tuple[str, ...], list] = {}
    for m in defs.metrics:
        plans.setdefault(m.group_by, []).append(m)
    plan_keys = list(plans)
    key_types = {f.name: SPARK_TYPES[f.type] for f in ds.fields}

    # Buckets of whole windows split a day's work by time; windows of a local day (a zone other than UTC) are
    # not aligned to UTC multiples, so there the day is one bucket and the shards of group keys split it.
    utc = ds.calendar.is_utc

    def shard(cols):  # noqa: ANN001, ANN202
        return F.pmod(F.hash(*cols), F.lit(shards))

    if len(plan_keys) == 1:  # the usual case: every metric has the same group keys
        exploded = records.drop("event_id").withColumn("_plan", F.lit(0))  # ids are done with: not shipped on
    else:  # each record once per plan
        exploded = records.drop("event_id").withColumn(
            "_plan", F.explode(F.array(*[F.lit(i) for i in range(len(plan_keys))]))
        )
    bucket = shard_col = None
    for i, keys in enumerate(plan_keys):
        b = F.floor(F.col("event_time_ms") / bucket_ms(plans[keys])) if utc else F.lit(0)
        s = shard([F.col(f"`{k}`") for k in keys])
        bucket = F.when(F.col("_plan") == i, b) if bucket is None else bucket.when(F.col("_plan") == i, b)
        shard_col = F.when(F.col("_plan") == i, s) if shard_col is None else shard_col.when(F.col("_plan") == i, s)
    n_plans = len(plan_keys)

    def group_of(plan, bucket, shard):  # noqa: ANN001, ANN202
        """One long per (plan, bucket, shard): Spark sorts and hashes a single key column fastest."""
        return (bucket * shards + shard) * n_plans + plan

    grouped = exploded.select(
        *[c for c in exploded.columns if c != "_plan"], group_of(F.col("_plan"), bucket, shard_col).alias("_group")
    )

    metric_plan = {m.name: i for i, keys in enumerate(plan_keys) for m in plans[keys]}
    stream = spark.range(1, numPartitions=1).mapInPandas(
        _stream_fn(url, day.isoformat()),
        "metric string, group_key string, window_start_ms bigint, value double, detail string",
    )
    plan_of = F.create_map(*[x for name, i in metric_plan.items() for x in (F.lit(name), F.lit(i))])
    # rows of a metric the definitions no longer have cannot be judged (nor grouped): left out
    stream = stream.withColumn("_plan", plan_of[F.col("metric")]).where(F.col("_plan").isNotNull())
    s_bucket = s_shard = None
    for i, keys in enumerate(plan_keys):
        parts = F.split(F.col("group_key"), r"\|", len(keys))  # the text key back to typed values
        typed = [parts.getItem(j).cast(key_types[k]) for j, k in enumerate(keys)]
        b = F.floor(F.col("window_start_ms") / bucket_ms(plans[keys])) if utc else F.lit(0)
        s_bucket = F.when(F.col("_plan") == i, b) if s_bucket is None else s_bucket.when(F.col("_plan") == i, b)
        sh = shard(typed)
        s_shard = F.when(F.col("_plan") == i, sh) if s_shard is None else s_shard.when(F.col("_plan") == i, sh)
    stream = stream.withColumn("_group", group_of(F.col("_plan"), s_bucket, s_shard)).drop("_plan")

    names = [[m.name for m in plans[k]] for k in plan_keys]
    busy = spark.sparkContext.accumulator(0.0)
    out = (
        grouped.groupBy("_group")
        .cogroup(stream.groupBy("_group"))
        .applyInPandas(_windows_fn(defs_path, names, busy), OUTPUT_SCHEMA)
    )
    rejected = checked.where("_invalid = 1").dropDuplicates(["_epoch", "_partition", "_offset"]).groupBy(REJECT_COLUMN)
    observations["rejected_by_reason"] = rejected.count()  # a second read, run only when some record was rejected
    stages = {"read": raw, "validate": checked, "dedupe": records, "aggregate": out}
    return stages, observations, busy


def _empty_day(
    settings: config.Settings, defs: Definitions, day: date, run_id: str, path: Path, archive: str | None
) -> int:
    """A day with no lake partition: certified empty (its truth is no window, for every metric) when the stream's
    watermark has passed its end plus the lateness on every partition; refused otherwise."""
    from batchmark.lake import day_completeness

    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    done, why = day_completeness(
        settings.events_lake, settings.events_topic, day, settings.partitions, lateness, defs.dataset.calendar
    )
    with storage.transaction(settings.database_url) as cur:  # results of the day mean its partition went missing
        cur.execute("SELECT count(*) FROM stream.results WHERE day = %s", (day,))
        stream_windows = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM truth.results WHERE day = %s", (day,))
        truth_windows = cur.fetchone()[0]
    if archive:
        what = "an archive was given for it: the recompute needs the stream's lake partition of the day too"
    elif stream_windows or truth_windows:
        what = (
            f"the stream wrote {stream_windows} windows and the truth has {truth_windows} for it, so its lake "
            "partition went missing: restore it (or replay the day) instead of certifying the day empty"
        )
    else:
        what = "" if done else why
    if what:
        print(f"no lake partition for {day} at {path}, and the day cannot be certified empty: {what}", file=sys.stderr)
        return 2
    rows = storage.swap_truth_day(settings.database_url, day, [m.name for m in defs.metrics], run_id, {})
    summary = {"day": day.isoformat(), "run_id": run_id, "empty": True, "why": why, "truth_events": 0, "rows": rows}
    summary |= {"lake_records": 0, "rejected": {}, "archive_rejected": {}, "archive": False}
    print(f"{day} has no events: certified empty ({why})", file=sys.stderr)
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", required=True, help="the day to recompute, YYYY-MM-DD")
    parser.add_argument("--archive", default=None, help="JSONL file of the day's events: the system of record")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--stages", action="store_true", help="also time the job's prefixes (for bench/batch)")
    args = parser.parse_args(argv)
    day = parse_day(args.date)
    run_id = args.run_id or f"manual-{uuid.uuid4().hex[:8]}"
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    path = day_dir(settings.events_lake, day)
    if not path.exists() or not any(path.glob("*.parquet")):
        return _empty_day(settings, defs, day, run_id, path, args.archive)
    if args.archive and not Path(args.archive).exists():
        print(f"archive {args.archive} does not exist", file=sys.stderr)
        return 2

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    t0 = time.monotonic()
    spark = SparkSession.builder.appName(f"batchmark-recompute-{day}").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    started = time.monotonic()
    shards = int(spark.conf.get("spark.sql.shuffle.partitions", "8"))
    archive = str(Path(args.archive).resolve()) if args.archive else None
    defs_path = str(settings.definitions_path)
    url = settings.database_url
    stage_seconds: dict[str, float] = {}
    if args.stages:  # each prefix of the job run to its end on its own: the differences are the stages' costs
        stages, _, _ = build(spark, defs, defs_path, path, archive, day, url, shards)
        for name, df in stages.items():
            t = time.monotonic()
            df.select(F.sum(F.hash(*df.columns) % 2)).collect()  # every column computed, nothing collected
            stage_seconds[name] = round(time.monotonic() - t, 2)
    stages, observations, busy = build(spark, defs, defs_path, path, archive, day, url, shards)
    try:
        t = time.monotonic()  # the job proper: what spark_seconds counts beside the start-up
        written = (
            stages["aggregate"].mapInPandas(_writer_fn(url, run_id), "rows long").agg(F.sum("rows")).collect()[0][0]
        )
        job_s = time.monotonic() - t
        n_read = spark.read.parquet(str(path)).count()  # parquet footers: no data read
        lake, truth = observations["lake"].get, observations["truth"].get
        rejected = {}
        if lake["rejected"]:  # rules changed since the stream landed these: say which and how many
            rejected = {r[REJECT_COLUMN]: r["count"] for r in observations["rejected_by_reason"].collect()}
        archive_rejected = observations["archive"].get if archive else {}
        spark_s = (started - t0) + (time.monotonic() - t)
        spark.stop()
        t1 = time.monotonic()
        rows = storage.swap_truth_day(
            url,
            day,
            [m.name for m in defs.metrics],
            run_id,
            {"lake": rejected, "archive": {r: n for r, n in archive_rejected.items() if n}},
        )
        swap_s = time.monotonic() - t1
    except BaseException:
        storage.clear_staging(url, run_id)
        raise
    summary = {
        "day": day.isoformat(),
        "run_id": run_id,
        "lake_records_read": n_read,
        "lake_records": lake["lake_records"],
        "truth_events": truth["truth_events"] or 0,
        "rejected": rejected,
        "archive_rejected": {r: n for r, n in archive_rejected.items() if n},
        "rows": rows,
        "rows_written": written or 0,
        "archive": bool(archive),
        "spark_seconds": round(spark_s, 2),
        "startup_seconds": round(started - t0, 2),
        "job_seconds": round(job_s, 2),
        "window_compute_seconds": round(busy.value, 2),  # summed over the workers (window_accuracy)
        "write_seconds": round(swap_s, 2),
        "stage_seconds": stage_seconds,
    }
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
