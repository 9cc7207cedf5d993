"""The batch side of each metric, as plain pandas-in/pandas-out functions that Spark runs per group.

Spark only moves data (read, de-duplicate, group); validation, window assignment and aggregation are the core's
own code, the same that the stream runs, so the two engines differ only in what data they see and in
online-versus-offline algorithms — never in a re-implementation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from batchmark.aggregates import aggregate_for
from batchmark.definitions import Definitions, Metric
from batchmark.events import Rejection, validate_record

RESULT_COLUMNS = ["metric", "group_key", "window_start_ms", "window_end_ms", "value", "n_events"]
REJECT_COLUMN = "_reject_reason"


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


def exact_windows(pdf: pd.DataFrame, metrics: list[Metric]) -> pd.DataFrame:
    """Events of some groups -> one row per (metric, group, window) with the exact (offline) value."""
    rows = []
    ts = pdf["event_time_ms"].astype("int64")
    for m in metrics:
        agg = aggregate_for(m.kind, m.params)
        starts = ts - ts % m.window_ms  # windows.window_start, element-wise
        values = m.value_fn(pdf) if m.value_fn is not None else pd.Series(1.0, index=pdf.index)
        frame = pd.DataFrame({"start": starts, "key": group_keys(pdf, m.group_by), "v": values})
        for (start, key), part in frame.groupby(["start", "key"], sort=True):
            vals = part["v"].tolist()
            rows.append((m.name, key, int(start), int(start) + m.window_ms, float(agg.exact(vals)), len(vals)))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
