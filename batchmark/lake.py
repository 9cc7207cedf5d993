"""The lake: raw valid events as Parquet, partitioned by event date, plus per-partition watermark files.

Layout under ``<lake>/events/``::

    date=2026-11-24/part-3f9a1c2e-p0-000000000000-000000012345.parquet   (epoch, partition 0, offsets)
    _watermarks/events-p0.json                      (per topic and partition: {"watermark_ms", "next_offset"})

Files are written to a hidden temporary name and renamed into place, so a reader never sees half a file
(Spark ignores names starting with '.' or '_'). The epoch names one life of a topic partition: a broker that
lost its topics (the embedded one keeps them in memory) starts offsets at 0 again under a new epoch, so
(epoch, partition, offset) always identifies one record. ``_watermark_ms`` is the partition's watermark when
the record arrived: with it the batch knows exactly which records each metric's stream counted late.
A day is complete when every partition's watermark has passed the day's end plus the largest allowed
lateness: the stream has then landed and closed all of it.
"""

from __future__ import annotations

import json
import operator
import os
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchmark.definitions import Dataset
from batchmark.windows import Calendar

_event_time = operator.itemgetter("event_time_ms")
_ARROW_TYPES = {"string": pa.string(), "float": pa.float64(), "int": pa.int64()}


def arrow_schema(ds: Dataset) -> pa.Schema:
    """Columns of a lake file: identity, time, the dataset's fields, and where the event came from."""
    return pa.schema(
        [("event_id", pa.string()), ("event_time_ms", pa.int64())]
        + [(f.name, _ARROW_TYPES[f.type]) for f in ds.fields]
        + [("_epoch", pa.string()), ("_partition", pa.int32()), ("_offset", pa.int64()), ("_watermark_ms", pa.int64())]
    )


def day_dir(root: Path, day: date) -> Path:
    return root / f"date={day.isoformat()}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LakeWriter:
    """Buffers clean events of one topic partition and lands them as Parquet files on flush.

    The buffer is columnar, per day: a fetched batch's events extend each column at once (a flush hands each
    column to Arrow as it is), so no per-event row is built.
    """

    def __init__(self, root: Path, ds: Dataset, partition: int, epoch: str) -> None:
        self.root = root
        self.ds = ds
        self.partition = partition
        self.epoch = epoch
        self.schema = arrow_schema(ds)
        self._names = self.schema.names[:-4]  # the event's own columns
        self._getters = [operator.itemgetter(name) for name in self._names]
        # day -> the event columns, then _offset and _watermark_ms
        self._columns: dict[date, list[list[Any]]] = {}
        self._day: tuple[int, int, list[list[Any]]] | None = None  # [start, end) ms of the last day added

    def _day_columns(self, ts: int) -> tuple[int, int, list[list[Any]]]:
        cur = self._day
        if cur is None or not cur[0] <= ts < cur[1]:
            cal = self.ds.calendar
            day = cal.day_of(ts)
            start, end = cal.day_bounds_ms(day)
            columns = self._columns.setdefault(day, [[] for _ in range(len(self._names) + 2)])
            cur = self._day = (start, end, columns)
        return cur

    def add(self, event: dict[str, Any], offset: int, watermark_ms: int) -> None:
        """Buffer a clean event with where it came from and the partition's watermark when it arrived."""
        self.add_many([event], [offset], [watermark_ms])

    def add_many(self, events: list[dict[str, Any]], offsets: list[int], watermarks: list[int]) -> None:
        """``add`` each event in order (the stream worker lands a fetched batch's run of events at once)."""
        if not events:
            return
        times = list(map(_event_time, events))
        start, end, columns = self._day_columns(times[0])
        if start <= min(times) and max(times) < end:  # all on one day: the common case
            for get, column in zip(self._getters, columns, strict=False):
                column.extend(map(get, events))
            columns[-2].extend(offsets)
            columns[-1].extend(watermarks)
            return
        for event, ts, offset, mark in zip(events, times, offsets, watermarks, strict=True):
            columns = self._day_columns(ts)[2]
            for name, column in zip(self._names, columns, strict=False):
                column.append(event[name])
            columns[-2].append(offset)
            columns[-1].append(mark)

    def flush(self) -> list[Path]:
        """Write every buffered day to its own file; returns the files written."""
        written = []
        for day, columns in self._columns.items():
            offsets = columns[-2]
            n = len(offsets)
            arrays = [pa.array(col, type=self.schema.field(i).type) for i, col in enumerate(columns[:-2])]
            arrays += [
                pa.repeat(pa.scalar(self.epoch, pa.string()), n),  # constant columns, without a list of n
                pa.repeat(pa.scalar(self.partition, pa.int32()), n),
                pa.array(offsets, pa.int64()),
                pa.array(columns[-1], pa.int64()),
            ]
            table = pa.Table.from_arrays(arrays, schema=self.schema)
            target_dir = day_dir(self.root, day)
            target_dir.mkdir(parents=True, exist_ok=True)
            first, last = offsets[0], offsets[-1]
            path = target_dir / f"part-{self.epoch}-p{self.partition}-{first:012d}-{last:012d}.parquet"
            tmp = path.with_name(f".{path.name}.tmp")
            # dictionary pages only for the constant columns: on ids they cost the flush twice its time
            pq.write_table(table, tmp, compression="snappy", use_dictionary=["_epoch", "_partition"])
            os.replace(tmp, path)
            written.append(path)
        self._columns.clear()  # only after every file is in place: a failed flush is retried whole
        self._day = None
        return written


def write_watermark(root: Path, topic: str, partition: int, watermark_ms: int, next_offset: int) -> None:
    """Record how far a partition's stream has landed and closed (after its results are committed)."""
    wm_dir = root / "_watermarks"
    wm_dir.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"watermark_ms": watermark_ms, "next_offset": next_offset}).encode()
    _atomic_write_bytes(wm_dir / f"{topic}-p{partition}.json", payload)


def read_watermarks(root: Path, topic: str) -> dict[int, int]:
    """{partition: watermark_ms} of every partition of a topic that has written one."""
    out = {}
    for path in (root / "_watermarks").glob(f"{topic}-p*.json"):
        out[int(path.stem.rpartition("-p")[2])] = json.loads(path.read_text())["watermark_ms"]
    return out


def day_completeness(
    root: Path, topic: str, day: date, partitions: int, lateness_ms: int, calendar: Calendar | None = None
) -> tuple[bool, str]:
    """Whether the stream has landed all of a day (a local day with a calendar), and a sentence saying why not."""
    marks = read_watermarks(root, topic)
    _, end = (calendar or Calendar()).day_bounds_ms(day)
    missing = [p for p in range(partitions) if p not in marks]
    if missing:
        return False, f"partitions {missing} have not reported a watermark yet"
    behind = {p: wm for p, wm in marks.items() if p < partitions and wm - lateness_ms < end}
    if behind:
        return False, f"partitions {sorted(behind)} have not passed the end of {day} plus the allowed lateness"
    return True, f"all {partitions} partitions have passed the end of {day}"
