"""The batch side of each metric, as plain pandas-in/pandas-out functions that Spark runs per group.

Spark only moves data (read, de-duplicate, join, group); validation, window assignment, aggregation and the
accuracy comparison are the core's own code, the same that the stream runs, so the two engines differ only in
what data they see and in online-versus-offline algorithms, never in a re-implementation.

Per window, with the records of one group flagged by where they came from:
- T: the truth set, every valid event once (the archive when one is given, else the lake's first copies);
- U: the distinct events the stream landed;  R: every record the stream landed (duplicate copies too);
- S: R minus the records that arrived after the metric's window had closed (from the watermark they met).
Then value(T) is the batch truth, and the stream's difference splits exactly into
  lost = value(U) - value(T),  duplicates = value(R) - value(U),  late = value(S) - value(R),
  sketch = stream value - value(S)   (zero for exact kinds; the online algorithm's own error otherwise).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from batchmark.aggregates import Aggregate
from batchmark.definitions import Definitions, Metric
from batchmark.events import Rejection, validate_record

REJECT_COLUMN = "_reject_reason"
FLAG_COLUMNS = ["_in_lake", "_copy", "_in_truth", "_watermark_ms"]
TRUTH_COLUMNS = ["metric", "group_key", "window_start_ms", "window_end_ms", "value", "n_events", "detail"]
ACCURACY_COLUMNS = [
    "stream_value",
    "error",
    "n_lost",
    "n_dup",
    "n_late",
    "lost_effect",
    "dup_effect",
    "late_effect",
    "sketch_effect",
    "accuracy_detail",
]
OUTPUT_SCHEMA = (
    "metric string, group_key string, window_start_ms bigint, window_end_ms bigint, value double, "
    "n_events bigint, detail string, stream_value double, error double, n_lost bigint, n_dup bigint, "
    "n_late bigint, lost_effect double, dup_effect double, late_effect double, sketch_effect double, "
    "accuracy_detail string"
)
NO_WATERMARK = -(2**62)
StreamValues = dict[tuple[str, str, int], tuple[float, Any]]
ARCHIVE_CHUNK_BYTES = 32 * 1024 * 1024


def line_ranges(path: str | Path, chunk_bytes: int = ARCHIVE_CHUNK_BYTES) -> list[tuple[str, int, int]]:
    """Split a JSONL file into byte ranges of about chunk_bytes, one Spark task each: a day's archive is then
    read in parallel with memory bounded by a chunk, never whole (a 1.6M-event day as one blob overflowed the
    driver's heap). A line belongs to the range it starts in (see :func:`read_line_range`)."""
    size = os.path.getsize(path)
    step = max(1, chunk_bytes)
    return [(str(path), start, min(start + step, size)) for start in range(0, size, step)] or [(str(path), 0, 0)]


def read_line_range(path: str | Path, start: int, end: int) -> Iterator[bytes]:
    """The raw lines (bytes, without the line end) that start in [start, end) of a file; empty lines skipped.

    Raw bytes, not text: a line that is not UTF-8 must reach validation as it is (reason invalid_utf8).
    """
    with open(path, "rb") as fh:
        if start > 0:
            fh.seek(start - 1)
            fh.readline()  # the tail of a line that started before this range: the previous range's
        while fh.tell() < end:
            line = fh.readline()
            if not line:
                break
            line = line.rstrip(b"\n").rstrip(b"\r")
            if line:
                yield line


def validate_frame(pdf: pd.DataFrame, defs: Definitions) -> pd.DataFrame:
    """Apply the stream's validation rules to lake rows; adds a reject-reason column ('' when valid)."""
    ds = defs.dataset
    names = ds.field_names
    reasons = []
    for rec in pdf[["event_id", "event_time_ms", *names]].itertuples(index=False, name=None):
        obj = {ds.event_id: rec[0], ds.event_time: int(rec[1]), **dict(zip(names, rec[2:], strict=True))}
        result = validate_record(obj, ds)
        reasons.append(result.reason if isinstance(result, Rejection) else "")
    out = pdf.copy()
    out[REJECT_COLUMN] = reasons
    return out


def validate_batches(batches: Iterator[pd.DataFrame], defs: Definitions) -> Iterator[pd.DataFrame]:
    for pdf in batches:
        yield validate_frame(pdf, defs)


def group_keys(pdf: pd.DataFrame, keys: tuple[str, ...]) -> pd.Series:
    """The same text group key as engine.group_key, for a whole frame."""
    if not keys:
        return pd.Series([""] * len(pdf), index=pdf.index)
    key = pdf[keys[0]].astype(str)
    for k in keys[1:]:
        key = key + "|" + pdf[k].astype(str)
    return key


def bucket_ms(metrics: list[Metric]) -> int:
    """A span that holds whole windows of every metric (their lcm; it divides a day as each window does)."""
    return math.lcm(*(m.window_ms for m in metrics))


def _value(agg: Aggregate, values: list[Any]) -> tuple[float | None, Any]:
    if not values and agg.kind not in ("count", "sum", "distinct", "topk", "binpack"):
        return None, None  # mean, min, max and quantiles of nothing are undefined
    return agg.exact(values)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def window_accuracy(pdf: pd.DataFrame, metrics: list[Metric], stream: StreamValues) -> pd.DataFrame:
    """Flagged records of some groups -> per (metric, group, window): truth, error and its attribution."""
    rows = []
    ts = pdf["event_time_ms"].to_numpy(dtype="int64")
    in_lake = pdf["_in_lake"].to_numpy(dtype=bool)
    first_copy = in_lake & (pdf["_copy"].to_numpy() == 0)
    in_truth = pdf["_in_truth"].to_numpy(dtype=bool)
    watermark = pdf["_watermark_ms"].to_numpy(dtype="int64")
    for m in metrics:
        agg = m.aggregate
        starts = ts - ts % m.window_ms  # windows.window_start, element-wise
        late = in_lake & (watermark - m.allowed_lateness_ms >= starts + m.window_ms)
        values = (m.value_fn(pdf) if m.value_fn is not None else pd.Series(1.0, index=pdf.index)).tolist()
        keys = group_keys(pdf, m.group_by).tolist()
        windows: dict[tuple[int, str], list[int]] = {}
        for i, wk in enumerate(zip(starts.tolist(), keys, strict=True)):
            windows.setdefault(wk, []).append(i)
        for (start, key), idx in sorted(windows.items()):
            truth = [values[i] for i in idx if in_truth[i]]
            if not truth:
                continue
            first = [values[i] for i in idx if first_copy[i]]
            landed = [values[i] for i in idx if in_lake[i]]
            seen = [values[i] for i in idx if in_lake[i] and not late[i]]
            v_truth, d_truth = agg.exact(truth)
            v_first, v_landed, v_seen = _value(agg, first)[0], _value(agg, landed)[0], _value(agg, seen)[0]
            s_value, s_detail = stream.get((m.name, key, start), (None, None))
            error = acc = None
            if s_value is not None:
                error = agg.error(s_value, s_detail, truth)
                acc = _accuracy_detail(agg, s_value, s_detail, truth, seen)
            rows.append(
                (
                    m.name,
                    key,
                    start,
                    start + m.window_ms,
                    float(v_truth),
                    len(truth),
                    json.dumps(d_truth) if d_truth is not None else None,
                    s_value,
                    error,
                    len(truth) - len(first),
                    len(landed) - len(first),
                    len(landed) - len(seen),
                    _diff(v_first, v_truth),
                    _diff(v_landed, v_first),
                    _diff(v_seen, v_landed),
                    _diff(s_value, v_seen),
                    json.dumps(acc) if acc else None,
                )
            )
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS + ACCURACY_COLUMNS)


def _accuracy_detail(agg: Aggregate, s_value: float, s_detail: Any, truth: list[Any], seen: list[Any]) -> dict:
    """Kind-specific figures beside the error: recall for top-k, the sketch's own rank error, FF/lower bound."""
    from batchmark.aggregates import BinPacking, Quantile, TopK, rank_error

    if isinstance(agg, TopK):
        return agg.recall(s_detail, truth)
    if isinstance(agg, Quantile) and seen:
        return {"sketch_rank_error": rank_error(s_value, sorted(seen), agg.q)}
    if isinstance(agg, BinPacking):
        lower = agg.exact(truth)[1]["lower_bound"]
        return {"ff_over_lower_bound": s_value / lower if lower else None, "lower_bound": lower}
    return {}
