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

import numpy as np
import pandas as pd

from batchmark.aggregates import Aggregate, text_codes
from batchmark.definitions import Definitions, Metric, load_definitions
from batchmark.windows import Calendar

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


_DEFINITIONS: dict[tuple[str, float], Definitions] = {}


def cached_definitions(path: str | Path) -> Definitions:
    """The definitions file, parsed once per process (Spark's Python workers are reused across tasks)."""
    key = (str(path), os.path.getmtime(path))
    if key not in _DEFINITIONS:
        _DEFINITIONS[key] = load_definitions(path)
    return _DEFINITIONS[key]


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


def _windows(pdf: pd.DataFrame, m: Metric, values: np.ndarray | None, sort_values: bool, cache: dict[Any, Any]) -> dict:
    """The frame's rows ordered by window (start, then group key; by value inside a window when asked), each
    row's window number in that order, each window's start, group key and end, and the record flags in that
    order. Metrics with the same group keys and window (and values, when sorted by them) share it: `cache`."""
    order_key = ("layout", m.group_by, m.window_ms, m.value_expr if sort_values else None)
    if order_key in cache:
        return cache[order_key]
    ts = pdf["event_time_ms"].to_numpy(dtype="int64")
    if ("windows", m.window_ms) not in cache:  # each row's window [start, end) in the dataset's calendar
        cache[("windows", m.window_ms)] = cache["calendar"].windows(ts, m.window_ms)
    starts, ends = cache[("windows", m.window_ms)]
    if ("keys", m.group_by) not in cache:
        cache[("keys", m.group_by)] = pd.factorize(group_keys(pdf, m.group_by))
    codes, keys = cache[("keys", m.group_by)]
    # one stable sort of a single integer (window number, then key): the order lexsort((codes, starts)) gives
    if ("window_numbers", m.window_ms) not in cache:
        cache[("window_numbers", m.window_ms)] = _rank_of(starts)
    w_of = cache[("window_numbers", m.window_ms)]
    combined = w_of * max(1, len(keys)) + codes
    if sort_values:  # by value inside a window: sort by value first, then stably by window
        by_value = np.argsort(values, kind="stable")
        order = by_value[np.argsort(combined[by_value], kind="stable")]
    else:
        order = np.argsort(combined, kind="stable")
    s, c = starts[order], codes[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    window = np.cumsum(new) - 1
    heads = np.flatnonzero(new)
    in_lake = pdf["_in_lake"].to_numpy(dtype=bool)[order]
    layout = {
        "order": order,
        "window": window,
        "starts": s[heads],
        "keys": np.asarray(keys, dtype=object)[c[heads]],
        "ends": ends[order][heads],
        "in_lake": in_lake,
        "truth": pdf["_in_truth"].to_numpy(dtype=bool)[order],
        "first": in_lake & (pdf["_copy"].to_numpy()[order] == 0),
        "watermark": pdf["_watermark_ms"].to_numpy(dtype="int64")[order],
    }
    cache[order_key] = layout
    return layout


def _rank_of(starts: np.ndarray) -> np.ndarray:
    """Each row's window number in start order (0, 1, ...)."""
    codes, _ = pd.factorize(starts, sort=True)  # hashing, then a sort of the few distinct starts
    return codes.astype(np.int64)


def _subsets(layout: dict, m: Metric, pdf: pd.DataFrame, cache: dict[Any, Any]) -> dict:
    """The metric's record subsets in window order (truth, first copies, landed, seen in time) with their
    counts per window and, per subset, which windows it differs from the truth in. Metrics that read every
    record and share a layout and a lateness share them."""
    key = ("subsets", id(layout), m.allowed_lateness_ms, None if m.reads_every_record else m.name)
    if key in cache:
        return cache[key]
    window, in_lake, truth, first = layout["window"], layout["in_lake"], layout["truth"], layout["first"]
    if not m.reads_every_record:  # records the metric does not read (null value, outside its where) are not its
        present = m.present_mask(pdf)[layout["order"]]
        in_lake, truth, first = in_lake & present, truth & present, first & present
    late = in_lake & (layout["watermark"] - m.allowed_lateness_ms >= layout["ends"][window])
    seen = in_lake & ~late
    n_windows = len(layout["starts"])
    masks = {"truth": truth, "first": first, "landed": in_lake, "seen": seen}
    counts = {name: np.bincount(window[mask], minlength=n_windows) for name, mask in masks.items()}
    differs = {
        name: np.bincount(window[masks[name] != truth], minlength=n_windows) > 0 for name in ("first", "landed", "seen")
    }
    cache[key] = out = {"masks": masks, "counts": counts, "differs": differs, "emitted": counts["truth"] > 0}
    return out


def _subset_values(
    agg: Aggregate,
    values: np.ndarray,
    labels: np.ndarray | None,
    mask: np.ndarray,
    window: np.ndarray,
    wanted: np.ndarray,
    counts: np.ndarray,
) -> tuple[dict[int, tuple[float | None, Any]], np.ndarray, np.ndarray]:
    """exact() of the rows in `mask`, for the wanted windows: {window: (value, detail)} (None where the kind
    has no value of nothing), with the subset's values and bounds per window for the accuracy figures.
    `counts` is the subset's rows per window."""
    bounds = np.concatenate([[0], np.cumsum(counts)])
    vals = values[mask]
    take = np.flatnonzero(wanted & (counts > 0))
    sub_bounds = np.concatenate([[0], np.cumsum(counts[take])])
    every = len(take) == int(np.count_nonzero(counts))  # every window with rows is wanted
    sub_values = vals if every else vals[wanted[window[mask]]]  # the wanted windows' rows, in window order
    found = agg.exact_windows(sub_values, sub_bounds, labels) if len(take) else []
    results = dict(zip(take.tolist(), found, strict=True))
    empty = agg.exact([]) if agg.defined_on_empty else (None, None)
    for w in np.flatnonzero(wanted & (counts == 0)).tolist():
        results[w] = empty
    return results, vals, bounds


def window_accuracy(
    pdf: pd.DataFrame, metrics: list[Metric], stream: StreamValues, calendar: Calendar | None = None
) -> pd.DataFrame:
    """Flagged records of some groups -> per (metric, group, window): truth, error and its attribution.

    Vectorized per metric: rows are ordered by window once per layout (metrics with the same group keys and
    window share it, and their subsets when they read the same records), and each kind's ``exact_windows``
    computes all windows of a subset (truth, first copies, landed, seen) at once; a subset equal to the truth
    in a window (the usual case) takes the truth's value instead of computing it again.
    """
    cache: dict[Any, Any] = {"calendar": calendar or Calendar()}  # windows in the dataset's days (UTC by default)
    frames = [_metric_windows(pdf, m, stream, cache) for m in metrics]
    rows = [r for f in frames for r in f]
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS + ACCURACY_COLUMNS)


def _metric_windows(pdf: pd.DataFrame, m: Metric, stream: StreamValues, cache: dict[Any, Any]) -> list[tuple[Any, ...]]:
    if pdf.empty:
        return []
    agg = m.aggregate
    labels = None
    if ("values", m.value_expr, agg.input) not in cache:  # metrics over the same values compute them once
        raw = m.value_fn(pdf) if m.value_fn is not None else pd.Series(1.0, index=pdf.index)
        if agg.input == "field" and m.value_type == "int" and raw.dtype.kind == "f":
            # an int column with nulls arrives as floats: back to Python ints, so the texts are the stream's '3'
            raw = pd.Series(raw.astype("Int64").to_numpy(dtype=object, na_value=None), index=raw.index)
        cache[("values", m.value_expr, agg.input)] = (
            text_codes(raw.to_numpy(), sort=True) if agg.input == "field" else (raw.to_numpy(), None)
        )
    raw_values, labels = cache[("values", m.value_expr, agg.input)]
    layout = _windows(pdf, m, raw_values, agg.sorted_input, cache)
    window, starts, keys, window_ends = layout["window"], layout["starts"], layout["keys"], layout["ends"]
    values = raw_values[layout["order"]]
    sub = _subsets(layout, m, pdf, cache)
    masks, counts, emitted = sub["masks"], sub["counts"], sub["emitted"]
    t_res, t_vals, t_bounds = _subset_values(agg, values, labels, masks["truth"], window, emitted, counts["truth"])
    per_subset = {}
    for name in ("first", "landed", "seen"):
        differs = sub["differs"][name]
        res = _subset_values(agg, values, labels, masks[name], window, emitted & differs, counts[name])
        per_subset[name] = (*res, differs)
    n_truth, n_first, n_landed, n_seen = counts["truth"], counts["first"], counts["landed"], counts["seen"]
    s_vals, s_bounds, s_differs = per_subset["seen"][1], per_subset["seen"][2], per_subset["seen"][3]
    rows = []
    for w in np.flatnonzero(emitted).tolist():
        start, key, end = int(starts[w]), keys[w], int(window_ends[w])
        v_truth, d_truth = t_res[w]
        v = {n: (res[w][0] if differs[w] else v_truth) for n, (res, _, _, differs) in per_subset.items()}
        s_value, s_detail = stream.get((m.name, key, start), (None, None))
        error = acc = None
        if s_value is not None:
            t_slice = t_vals[t_bounds[w] : t_bounds[w + 1]]
            seen_slice = s_vals[s_bounds[w] : s_bounds[w + 1]] if s_differs[w] else t_slice
            if labels is not None:
                t_slice, seen_slice = labels[t_slice], labels[seen_slice]
            error, acc = agg.accuracy(s_value, s_detail, t_slice, (v_truth, d_truth), seen_slice)
        rows.append(
            (
                m.name,
                key,
                start,
                end,
                float(v_truth),
                int(n_truth[w]),
                json.dumps(d_truth) if d_truth is not None else None,
                s_value,
                error,
                int(n_truth[w] - n_first[w]),
                int(n_landed[w] - n_first[w]),
                int(n_landed[w] - n_seen[w]),
                _diff(v["first"], v_truth),
                _diff(v["landed"], v["first"]),
                _diff(v["seen"], v["landed"]),
                _diff(s_value, v["seen"]),
                json.dumps(acc) if acc else None,
            )
        )
    return rows


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
