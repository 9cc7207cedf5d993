"""Nightly recompute: one day of the lake (and optionally the archive) -> exact metrics -> batch truth.

    spark-submit --master local[*] batch/recompute.py --date 2026-11-24 [--archive events.jsonl] [--run-id ID]
    (or: batchmark recompute --date 2026-11-24 [--archive events.jsonl])

Reads date=<day>/ of the lake (every valid record the stream landed, with the watermark it met), drops records
landed twice (same epoch, partition and offset), marks duplicate event ids, applies the stream's validation
rules, and, when an archive (the system of record: a JSONL file of the day's events) is given, adds the events
the stream never saw. Every metric is then computed with the core's window and aggregate code
(batchmark.batch_compute) inside Spark, together with each window's accuracy against the stream's value and the
attribution of the difference to lost, duplicated and late events and to the sketch itself. The day's rows of
truth.results and quality.window_accuracy are replaced in one Postgres transaction: readers see the old day or
the new one, never a mix. Prints one line ``BATCHMARK_RESULT {json}`` with the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from batchmark import config, storage
from batchmark.batch_compute import (
    ACCURACY_COLUMNS,
    NO_WATERMARK,
    OUTPUT_SCHEMA,
    REJECT_COLUMN,
    TRUTH_COLUMNS,
    bucket_ms,
    line_ranges,
    read_line_range,
    validate_batches,
    window_accuracy,
)
from batchmark.definitions import load_definitions
from batchmark.lake import day_dir
from batchmark.spark import RESULT_PREFIX
from batchmark.windows import day_bounds_ms, parse_day


def _spark_type(ftype: str) -> str:
    return {"string": "string", "float": "double", "int": "bigint"}[ftype]


def _metrics_fn(defs_path: str, names: list[str], stream: dict):
    """The per-group function Spark runs: the core's window_accuracy for these metrics."""

    def compute(pdf):
        d = load_definitions(defs_path)
        return window_accuracy(pdf, [d.metric(n) for n in names], stream)

    return compute


def _archive_fn(defs_path: str, start_ms: int, end_ms: int, batch_rows: int = 50_000):
    """Read byte ranges of the archive and validate each line with the core's rules: the day's valid events, and
    every rejection. Each input row is (path, start, end); output comes in frames of at most batch_rows."""

    def parse(batches):
        import pandas as pd

        from batchmark.events import Rejection, validate

        d = load_definitions(defs_path)
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


def stream_values(url: str, day) -> dict:  # noqa: ANN001
    """{(metric, group_key, window_start_ms): (value, detail)} of the stream for the day."""
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, (extract(epoch FROM window_start) * 1000)::bigint, value, detail "
            "FROM stream.results WHERE day = %s",
            (day,),
        )
        return {(m, g, int(s)): (v, d) for m, g, s, v, d in cur.fetchall()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--date", required=True, help="the day to recompute, YYYY-MM-DD")
    parser.add_argument("--archive", default=None, help="JSONL file of the day's events: the system of record")
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
    if args.archive and not Path(args.archive).exists():
        print(f"archive {args.archive} does not exist", file=sys.stderr)
        return 2

    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    t0 = time.monotonic()
    spark = SparkSession.builder.appName(f"batchmark-recompute-{day}").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    ds = defs.dataset
    columns = ["event_id string", "event_time_ms bigint"] + [f"`{f.name}` {_spark_type(f.type)}" for f in ds.fields]
    schema = ", ".join(columns + ["_epoch string", "_partition int", "_offset bigint", "_watermark_ms bigint"])
    raw = spark.read.schema(schema).parquet(str(path))
    defs_path = str(settings.definitions_path)

    def _validate(batches):  # runs on executors: reload the definitions there
        yield from validate_batches(batches, load_definitions(defs_path))

    landed = raw.dropDuplicates(["_epoch", "_partition", "_offset"])  # a record landed twice (at-least-once)
    checked = landed.mapInPandas(_validate, f"{schema}, {REJECT_COLUMN} string").cache()
    n_read = raw.count()
    n_records = checked.count()
    rejected = {
        r[REJECT_COLUMN]: r["count"]
        for r in checked.where(F.col(REJECT_COLUMN) != "").groupBy(REJECT_COLUMN).count().collect()
    }
    by_arrival = Window.partitionBy("event_id").orderBy("_epoch", "_partition", "_offset")
    lake = (
        checked.where(F.col(REJECT_COLUMN) == "")
        .withColumn("_copy", F.row_number().over(by_arrival) - 1)  # 0: the first copy of its event id
        .withColumn("_in_lake", F.lit(True))
        .drop(REJECT_COLUMN, "_epoch", "_partition", "_offset")
    )
    fields = ["event_id", "event_time_ms", *ds.field_names]
    archive_rejected: dict[str, int] = {}
    if args.archive:
        start_ms, end_ms = day_bounds_ms(day)
        ranges = line_ranges(str(Path(args.archive).resolve()))  # one task per ~32 MB, each read as raw bytes
        parsed = (
            spark.createDataFrame(
                spark.sparkContext.parallelize(ranges, len(ranges)), "path string, start bigint, `end` bigint"
            )
            .mapInPandas(_archive_fn(defs_path, start_ms, end_ms), ", ".join(columns) + f", {REJECT_COLUMN} string")
            .cache()
        )
        archive_rejected = {
            r[REJECT_COLUMN]: r["count"]
            for r in parsed.where(F.col(REJECT_COLUMN) != "").groupBy(REJECT_COLUMN).count().collect()
        }
        archive = parsed.where(F.col(REJECT_COLUMN) == "").drop(REJECT_COLUMN).dropDuplicates(["event_id"])
        ids = archive.select("event_id").withColumn("_archived", F.lit(True))
        lake = (
            lake.join(ids, "event_id", "left")
            .withColumn("_in_truth", (F.col("_copy") == 0) & F.col("_archived").isNotNull())
            .drop("_archived")
        )
        unseen = (
            archive.join(lake.select("event_id").distinct(), "event_id", "left_anti")
            .withColumn("_copy", F.lit(0))
            .withColumn("_in_lake", F.lit(False))
            .withColumn("_in_truth", F.lit(True))
            .withColumn("_watermark_ms", F.lit(NO_WATERMARK))
        )
        records = lake.select(*fields, "_in_lake", "_copy", "_in_truth", "_watermark_ms").unionByName(
            unseen.select(*fields, "_in_lake", "_copy", "_in_truth", "_watermark_ms")
        )
    else:
        records = lake.withColumn("_in_truth", F.col("_copy") == 0)
    records = records.cache()
    n_truth = records.where("_in_truth").count()

    stream = stream_values(settings.database_url, day)
    by_keys: dict[tuple[str, ...], list] = {}
    for m in defs.metrics:
        by_keys.setdefault(m.group_by, []).append(m)
    out = []
    for keys, metrics in by_keys.items():
        bucket = F.floor(F.col("event_time_ms") / bucket_ms(metrics)).alias("_bucket")  # whole windows per task
        fn = _metrics_fn(defs_path, [m.name for m in metrics], stream)
        out.extend(records.groupBy(*[F.col(k) for k in keys], bucket).applyInPandas(fn, OUTPUT_SCHEMA).collect())
    spark_s = time.monotonic() - t0
    spark.stop()

    def _j(text):  # noqa: ANN001, ANN202
        return json.loads(text) if text else None

    truth = [tuple(r[c] for c in TRUTH_COLUMNS[:-1]) + (_j(r["detail"]),) for r in out]
    accuracy = [
        (
            r["metric"],
            r["group_key"],
            r["window_start_ms"],
            *(r[c] for c in ACCURACY_COLUMNS[:-1]),
            _j(r["accuracy_detail"]),
        )
        for r in out
    ]
    t1 = time.monotonic()
    storage.replace_truth_day(settings.database_url, day, [m.name for m in defs.metrics], truth, run_id, accuracy)
    summary = {
        "day": day.isoformat(),
        "run_id": run_id,
        "lake_records_read": n_read,
        "lake_records": n_records,
        "truth_events": n_truth,
        "rejected": rejected,
        "archive_rejected": archive_rejected,
        "rows": len(truth),
        "archive": bool(args.archive),
        "spark_seconds": round(spark_s, 2),
        "write_seconds": round(time.monotonic() - t1, 2),
    }
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
