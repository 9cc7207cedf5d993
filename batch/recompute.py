"""Nightly recompute: one day of the lake -> exact metrics -> that day's batch truth in Postgres.

    spark-submit --master local[*] batch/recompute.py --date 2026-11-24 [--run-id ID]
    (or: batchmark recompute --date 2026-11-24)

Reads date=<day>/ of the lake, drops records landed twice (same epoch, partition and offset) and then duplicate
event ids (keeping the first), applies the stream's validation rules, and computes every metric with the core's
window and aggregate code (batchmark.batch_compute) inside Spark. The day's truth rows are then replaced in one
Postgres transaction: readers see the old day or the new one, never a mix. Prints one line
``BATCHMARK_RESULT {json}`` with the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from batchmark import config, storage
from batchmark.batch_compute import REJECT_COLUMN, RESULT_COLUMNS, exact_windows, validate_batches
from batchmark.definitions import load_definitions
from batchmark.lake import day_dir
from batchmark.spark import RESULT_PREFIX
from batchmark.windows import parse_day


def _spark_type(ftype: str) -> str:
    return {"string": "string", "float": "double", "int": "bigint"}[ftype]


def _metrics_fn(defs_path: str, names: list[str]):
    """The per-group function Spark runs: the core's exact_windows for these metrics."""

    def compute(pdf):
        d = load_definitions(defs_path)
        return exact_windows(pdf, [d.metric(n) for n in names])

    return compute


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", required=True, help="the day to recompute, YYYY-MM-DD")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    day = parse_day(args.date)
    run_id = args.run_id or f"manual-{uuid.uuid4().hex[:8]}"
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    path = day_dir(settings.events_lake, day)
    if not path.exists() or not any(path.glob("*.parquet")):
        print(f"no lake partition for {day} at {path}: has the stream landed that day?", file=sys.stderr)
        return 2

    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    t0 = time.monotonic()
    spark = SparkSession.builder.appName(f"batchmark-recompute-{day}").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    ds = defs.dataset
    schema = ", ".join(
        ["event_id string", "event_time_ms bigint"]
        + [f"`{f.name}` {_spark_type(f.type)}" for f in ds.fields]
        + ["_epoch string", "_partition int", "_offset bigint"]
    )
    raw = spark.read.schema(schema).parquet(str(path))
    n_records = raw.count()
    once = raw.dropDuplicates(["_epoch", "_partition", "_offset"])  # a record landed twice (at-least-once)
    first = Window.partitionBy("event_id").orderBy("_epoch", "_partition", "_offset")
    unique = once.withColumn("_n", F.row_number().over(first)).where("_n = 1").drop("_n")
    defs_path = str(settings.definitions_path)

    def _validate(batches):  # runs on executors: reload the definitions there
        yield from validate_batches(batches, load_definitions(defs_path))

    checked = unique.mapInPandas(_validate, f"{schema}, {REJECT_COLUMN} string").cache()
    rejected = {
        r[REJECT_COLUMN]: r["count"]
        for r in checked.where(F.col(REJECT_COLUMN) != "").groupBy(REJECT_COLUMN).count().collect()
    }
    valid = checked.where(F.col(REJECT_COLUMN) == "").drop(REJECT_COLUMN)
    n_unique = checked.count()

    out_schema = (
        "metric string, group_key string, window_start_ms bigint, window_end_ms bigint, value double, n_events bigint"
    )
    rows = []
    by_keys: dict[tuple[str, ...], list[str]] = {}
    for m in defs.metrics:
        by_keys.setdefault(m.group_by, []).append(m.name)
    for keys, names in by_keys.items():
        hour = F.floor(F.col("event_time_ms") / 3_600_000).alias("_hour")  # spreads a group's day over tasks
        result = valid.groupBy(*[F.col(k) for k in keys], hour).applyInPandas(_metrics_fn(defs_path, names), out_schema)
        rows.extend(tuple(r[c] for c in RESULT_COLUMNS) for r in result.collect())
    spark_s = time.monotonic() - t0
    spark.stop()

    t1 = time.monotonic()
    storage.replace_truth_day(settings.database_url, day, [m.name for m in defs.metrics], rows, run_id)
    summary = {
        "day": day.isoformat(),
        "run_id": run_id,
        "lake_records": n_records,
        "unique_events": n_unique,
        "rejected": rejected,
        "rows": len(rows),
        "spark_seconds": round(spark_s, 2),
        "write_seconds": round(time.monotonic() - t1, 2),
    }
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
