"""Replay a stored dataset (JSONL, CSV or Parquet) record by record into a topic, keeping event time.

JSONL lines are sent byte for byte, malformed ones included, so the stream sees exactly what the file holds.
Each record is keyed by the dataset's partition key (so one group stays in one partition) and stamped with its
event time (one without a usable event time with the previous record's: the worker counts its rejection on the
file's day). At the end a watermark punctuation goes to every partition: it tells the workers that the replayed
days are over, so they close the last windows (history has no 'later events' to do that).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from tqdm import tqdm

from batchmark.definitions import Dataset, Definitions
from batchmark.errors import ConfigError
from batchmark.events import Rejection, decode, parse_event_time, validate_record
from batchmark.kafka import client_kwargs

WATERMARK_KEY = "__batchmark_watermark__"


def watermark_record(watermark_ms: int) -> bytes:
    """The punctuation that moves a partition's watermark to watermark_ms."""
    return orjson.dumps({WATERMARK_KEY: watermark_ms})


def end_of_stream_watermark(max_ts: int, defs: Definitions) -> int:
    """The end-of-stream watermark after records up to max_ts: the end of the last replayed day plus the largest
    lateness, so every window of it is closed."""
    ds = defs.dataset
    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    return ds.calendar.day_bounds_ms(ds.calendar.day_of(max_ts))[1] + lateness


def max_event_time(path: Path, defs: Definitions) -> int:
    """The largest usable event time of a file (what the replayer's punctuation is computed from)."""
    ds = defs.dataset
    best: int | None = None
    for raw in read_records(path, ds):
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            ts = parse_event_time(orjson.loads(raw).get(ds.event_time))
            if ts is not None and ds.min_event_time_ms <= ts < ds.max_event_time_ms:
                best = ts if best is None or ts > best else best
    if best is None:
        raise ConfigError(f"{path} has no record with a usable event time")
    return best


def read_records(path: Path, ds: Dataset | None = None) -> Iterator[bytes]:
    """The records of a dataset file as JSON bytes, in file order.

    CSV cells are typed by the dataset's schema when one is given (a numeric-looking id stays a string);
    without a schema, numbers are guessed. A dataset with a [dataset.csv] table reads CSV files through it
    (batchmark.csv_source: renamed and ignored columns, null tokens, derived ids, local times).
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, "rb") as fh:
            for line in fh:
                line = line.rstrip(b"\r\n")
                if line:
                    yield line
    elif suffix == ".csv" and ds is not None and ds.csv is not None:
        from batchmark.csv_source import CsvMapping

        mapping = CsvMapping(path, ds)
        mapping.check_ids()  # a collision is refused before the first record goes out
        yield from mapping.records()
    elif suffix == ".csv":
        types = {f.name: f.type for f in ds.fields} | {ds.event_id: "string"} if ds else {}
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                yield orjson.dumps({k: _csv_value(v, types.get(k)) for k, v in row.items()})
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for row in batch.to_pylist():
                yield orjson.dumps(row, default=str)
    else:
        from batchmark.errors import ConfigError

        raise ConfigError(f"cannot replay {path.name}: use a .jsonl, .csv or .parquet file")


def _csv_value(v: str, ftype: str | None = None) -> object:
    """A CSV cell as the schema's type ('string', 'float', 'int'); unparseable cells stay text for validation."""
    if ftype == "string":
        return v
    for cast in (int, float) if ftype != "float" else (float,):
        try:
            return cast(v)
        except ValueError:
            continue
    return v


@dataclass
class ReplayStats:
    """What a replay sent; `rejected` counts, per reason, the records the worker will dead-letter."""

    records: int
    seconds: float
    max_event_time_ms: int | None
    end_watermark_ms: int | None
    rejected: Counter[str] = field(default_factory=Counter)
    example: str = ""  # the first rejection: its reason and detail


async def replay_async(
    path: Path,
    bootstrap: str,
    topic: str,
    defs: Definitions,
    rate: float | None = None,
    progress: bool = True,
    end_watermark: bool = True,
) -> ReplayStats:
    """Send every record of `path` to `topic`; returns counts and the watermark sent at the end."""
    from aiokafka import AIOKafkaProducer

    ds = defs.dataset
    producer = AIOKafkaProducer(
        **client_kwargs(
            bootstrap,
            linger_ms=5,
            max_batch_size=1 << 20,
            acks=1,
            max_request_size=8 << 20,  # oversized records must reach the worker, which dead-letters them
        )
    )
    try:
        await producer.start()
    except BaseException:
        await producer.stop()  # a client that never connected still holds its resources
        raise
    sent = 0
    max_ts: int | None = None
    rejected: Counter[str] = Counter()
    example = ""
    last_ts: int | None = None  # the last usable event time sent
    t0 = time.monotonic()
    bar = tqdm(desc=f"replay {path.name}", unit="ev", disable=not progress, mininterval=0.5)
    try:
        pending = []
        for raw in read_records(path, ds):
            key = ts = None
            obj = decode(raw)
            checked = obj if isinstance(obj, Rejection) else validate_record(obj, ds)
            if isinstance(checked, Rejection):  # the worker's own rule: it will dead-letter this record
                rejected[checked.reason] += 1
                example = example or f"record {sent + 1}: {checked.reason}: {checked.detail}"
            if isinstance(obj, Rejection) and obj.reason == "too_large":  # still keyed and stamped like the rest
                with contextlib.suppress(orjson.JSONDecodeError):
                    obj = orjson.loads(raw)
            if isinstance(obj, dict):
                k = obj.get(ds.partition_key)
                key = str(k).encode() if k is not None else None
                ts = parse_event_time(obj.get(ds.event_time))
            if ts is not None and ds.min_event_time_ms <= ts < ds.max_event_time_ms:
                max_ts = ts if max_ts is None or ts > max_ts else max_ts
                last_ts = ts
            else:
                ts = last_ts  # no usable event time: stamped like its neighbour, so its day is the file's day
            pending.append(await producer.send(topic, raw, key=key, timestamp_ms=ts))
            sent += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending.clear()
            if rate and sent % 100 == 0:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
        bar.update(len(pending))
        wm = None
        if end_watermark and max_ts is not None:
            wm = end_of_stream_watermark(max_ts, defs)
            for p in sorted(await producer.partitions_for(topic)):
                await producer.send_and_wait(topic, watermark_record(wm), partition=p)
    finally:
        bar.close()
        await producer.stop()
    return ReplayStats(sent, time.monotonic() - t0, max_ts, wm, rejected, example)


def replay(path: Path, bootstrap: str, topic: str, defs: Definitions, **kw: object) -> ReplayStats:
    from batchmark.broker import check_reachable

    check_reachable(bootstrap)
    return asyncio.run(replay_async(path, bootstrap, topic, defs, **kw))  # type: ignore[arg-type]
