"""The stream-side computation, independent of Faust: window state per partition, watermarks, closing.

The Faust agent (streaming/app.py) feeds events here and writes what ``close_ready`` returns. Keeping it
apart from Faust makes it testable on its own and lets the replay tests and benchmarks drive it directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import accumulate
from operator import itemgetter
from typing import Any, NamedTuple

from batchmark.aggregates import Aggregate, aggregate_for
from batchmark.definitions import Definitions, Metric


@dataclass(frozen=True, slots=True)
class WindowResult:
    """The final value of one metric for one group in one window."""

    metric: str
    group_key: str
    window_start_ms: int
    window_end_ms: int
    value: float
    n_events: int
    detail: dict[str, Any] | None = None


@dataclass
class _MetricState:
    metric: Metric
    agg: Aggregate
    # (window_start, group_key) -> [aggregate state, event count, offset of its first event]
    windows: dict[tuple[int, str], list[Any]] = field(default_factory=dict)
    # window_start -> events dropped because they came after the window closed
    late: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # the rows of its plan group in PartitionState (shared with the metrics of the same window and grouping)
    rows: dict[tuple[int, str], list[list[Any]]] = field(default_factory=dict)


class _Member(NamedTuple):
    """A metric in its plan group, with what folding an event into it needs (see PartitionState._plan)."""

    state: _MetricState
    value_fn: Any  # the metric's value of an event, or None (count)
    add: Any
    update: Any  # folds a value in place, or None
    new: Any
    leader: int  # the earlier member whose state this one reads (one KLL for p50, p95, p99), else -1
    present: Any  # whether a record counts for the metric; None: every record does
    add_many: Any


def group_key(event: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The text key of an event's group ('' for a metric over all events)."""
    if len(keys) == 1:
        return str(event[keys[0]])
    return "|".join(str(event[k]) for k in keys)


class PartitionState:
    """Open windows and the watermark of one topic partition."""

    def __init__(self, defs: Definitions) -> None:
        self.watermark_ms = -(2**62)
        self.metrics = [_MetricState(m, aggregate_for(m.kind, m.params)) for m in defs.metrics]
        self.late_events = 0
        self.calendar = defs.dataset.calendar  # day-aligned windows in the dataset's time zone
        # fields whose value is always a str: a group key of one of them needs no str() (add_batch)
        self._texts = frozenset(f.name for f in defs.dataset.fields if f.type == "string" and not f.nullable)
        # Metrics with the same window, lateness and grouping share one window start, closed test, group key
        # and window lookup per event: (size, lateness, group_by, members, rows). rows maps a window key to
        # the members' slots (the same lists as in each metric's own ``windows``); a member is a _Member. A
        # window a metric read nothing in (every record null for it, or outside its where) has n = 0 and is
        # never written, as in the batch truth.
        plan: dict[tuple[int, int, tuple[str, ...]], list[_Member]] = {}
        rows_of: dict[tuple[int, int, tuple[str, ...]], dict[tuple[int, str], list[list[Any]]]] = {}
        owners: dict[tuple[Any, ...], int] = {}
        for ms in self.metrics:
            m, agg = ms.metric, ms.agg
            grouping = (m.window_ms, m.allowed_lateness_ms, tuple(m.group_by))
            members = plan.setdefault(grouping, [])
            ms.rows = rows_of.setdefault(grouping, {})
            share = agg.shared_state_key()
            leader = -1
            if share is not None and m.value_expr is not None:
                leader = owners.setdefault((grouping, m.value_expr, m.where, share), len(members))
                leader = -1 if leader == len(members) else leader
            present = None if m.reads_every_record else m.present  # None: every record counts (the fast path)
            update = agg.in_place_update()
            members.append(_Member(ms, m.value_fn, agg.add, update, agg.new, leader, present, agg.add_many))
        self._plan: list[tuple[int, int, tuple[str, ...], list[_Member], dict[tuple[int, str], list]]] = [
            (size, late, keys, members, rows_of[(size, late, keys)]) for (size, late, keys), members in plan.items()
        ]

    def add(self, event: dict[str, Any], offset: int = 0, count_late: bool = True) -> None:
        """Fold one clean event into every metric's open window, or count it late.

        count_late=False is for events re-read after a restart: one that falls in a closed window was
        already counted (in the window's result, or as late) before the checkpoint.
        """
        ts = event["event_time_ms"]
        wm = self.watermark_ms
        utc = self.calendar.is_utc
        for size, lateness, keys, members, rows in self._plan:
            if utc:
                start = ts - ts % size
                end = start + size
            else:
                start, end = self.calendar.window(ts, size)
            if wm - lateness >= end:  # the window is closed: the event is late for these metrics
                if count_late:
                    for m in members:
                        if m.present is None or m.present(event):
                            m.state.late[start] += 1
                            self.late_events += 1
                continue
            key = (start, group_key(event, keys))
            row = rows.get(key)
            if row is None:
                row = rows[key] = []
                for ms, _, _, _, agg_new, leader, _, _ in members:
                    slot = ms.windows[key] = [agg_new() if leader < 0 else row[leader][0], 0, offset]
                    row.append(slot)
            for (_, value_fn, agg_add, update, _, leader, present, _), slot in zip(members, row, strict=True):
                if present is not None and not present(event):
                    continue
                if leader < 0:
                    value = value_fn(event) if value_fn is not None else 1.0
                    if update is not None:
                        update(slot[0], value)
                    else:
                        slot[0] = agg_add(slot[0], value)
                slot[1] += 1
        if ts > wm:
            self.watermark_ms = ts

    def add_batch(self, events: list[dict[str, Any]], offsets: list[int], count_late: bool = True) -> list[int]:
        """Fold clean events in order with the effect of ``add`` on each in turn; returns the watermark before each
        event (what the lake stores with it). The stream worker's path: per window group it sorts the batch's
        events into their windows once, then hands each window's values to its metrics at once (``add_many``).
        Tests hold it to ``add``."""
        n = len(events)
        if not n:
            return []
        times = list(map(itemgetter("event_time_ms"), events))
        marks = list(accumulate(times, max, initial=self.watermark_ms))  # marks[i]: the watermark before event i
        highest = marks[n - 1]  # the largest watermark any event of the batch meets
        utc = self.calendar.is_utc
        key_texts: dict[tuple[str, ...], list[str]] = {}  # group keys of every event, per grouping
        columns: dict[str, Any] = {}  # a value expression's value for every event (where all are folded)
        for size, lateness, keys, members, rows in self._plan:
            if utc:
                starts = [t - t % size for t in times]
                closing = highest - lateness >= min(starts) + size  # some event may meet a closed window
            else:
                bounds = [self.calendar.window(t, size) for t in times]
                starts = [b[0] for b in bounds]
                closing = highest - lateness >= min(b[1] for b in bounds)
            texts = key_texts.get(keys)
            if texts is None:
                if len(keys) == 1:
                    k0 = keys[0]
                    texts = list(map(itemgetter(k0), events))
                    if k0 not in self._texts:
                        texts = list(map(str, texts))
                else:
                    texts = ["|".join(str(e[k]) for k in keys) for e in events]
                key_texts[keys] = texts
            groups: defaultdict[tuple[int, str], list[int]] = defaultdict(list)  # window -> its events, in order
            if not closing:
                for i, key in enumerate(zip(starts, texts, strict=True)):
                    groups[key].append(i)
            else:
                for i, key in enumerate(zip(starts, texts, strict=True)):
                    end = key[0] + size if utc else bounds[i][1]
                    if marks[i] - lateness >= end:  # the window is closed: late for these metrics
                        if count_late:
                            event = events[i]
                            for m in members:
                                if m.present is None or m.present(event):
                                    m.state.late[key[0]] += 1
                                    self.late_events += 1
                        continue
                    groups[key].append(i)
            whole = len(groups) == 1 and len(next(iter(groups.values()))) == n  # the batch is one window
            for key, idx in groups.items():
                row = rows.get(key)
                if row is None:
                    row = rows[key] = []
                    first = offsets[idx[0]]
                    for ms, _, _, _, agg_new, leader, _, _ in members:
                        slot = ms.windows[key] = [agg_new() if leader < 0 else row[leader][0], 0, first]
                        row.append(slot)
                for (ms, value_fn, _, _, _, leader, present, add_many), slot in zip(members, row, strict=True):
                    sel = idx if present is None else [i for i in idx if present(events[i])]
                    if not sel:
                        continue
                    if leader < 0:
                        if value_fn is None:
                            values: Any = [1.0] * len(sel)
                        elif present is not None or closing:  # only the events add would fold
                            values = [value_fn(events[i]) for i in sel]
                        else:  # every event of the batch is folded here: its value once for all the metrics
                            expr = ms.metric.value_expr
                            column = columns.get(expr)
                            if column is None:
                                column = columns[expr] = list(map(value_fn, events))
                            if whole:
                                values = column
                            elif len(sel) > 1:
                                values = itemgetter(*sel)(column)
                            else:
                                values = (column[sel[0]],)
                        slot[0] = add_many(slot[0], values)
                    slot[1] += len(sel)
        if marks[n] > self.watermark_ms:
            self.watermark_ms = marks[n]
        return marks[:n]

    def has_closed_windows(self) -> bool:
        """Whether some open window is closed under the current watermark (its result can be written)."""
        wm = self.watermark_ms
        for size, lateness, _, _, rows in self._plan:
            if rows:
                start = min(k[0] for k in rows)
                if wm - lateness >= self.window_end(start, size):
                    return True
        return False

    def window_end(self, start_ms: int, size_ms: int) -> int:
        """The end of the window of size_ms that starts at start_ms (shorter or longer on a DST change)."""
        return start_ms + size_ms if self.calendar.is_utc else self.calendar.window_end(start_ms, size_ms)

    def advance(self, watermark_ms: int) -> None:
        """Move the watermark forward (e.g. an end-of-stream punctuation); never backwards."""
        if watermark_ms > self.watermark_ms:
            self.watermark_ms = watermark_ms

    def close_ready(self, flush_all: bool = False) -> tuple[list[WindowResult], list[tuple[int, tuple[int, str]]]]:
        """Results of every window the watermark has closed (all if flush_all), and their keys for ``forget``.

        Nothing is removed here, so a failed write loses nothing: call ``forget`` once the results are stored.
        """
        out: list[WindowResult] = []
        keys: list[tuple[int, tuple[int, str]]] = []
        wm = self.watermark_ms
        for i, ms in enumerate(self.metrics):
            m = ms.metric
            for k, (state, n, _) in ms.windows.items():
                end = self.window_end(k[0], m.window_ms)
                if flush_all or wm - m.allowed_lateness_ms >= end:
                    if n:  # n = 0: the metric read no record here (see present), so there is no value to write
                        value, detail = ms.agg.result(state)
                        out.append(WindowResult(m.name, k[1], k[0], end, value, n, detail))
                    keys.append((i, k))
        return out, keys

    def provisional(
        self, exclude: list[tuple[int, tuple[int, str]]] = (), known: set[tuple[str, str, int]] | None = None
    ) -> list[WindowResult]:
        """The value so far of every open window (not in exclude; with `known`, only windows whose (metric,
        group key, start) is not in it): a snapshot, the windows stay open."""
        skip = set(exclude)
        return [
            WindowResult(
                ms.metric.name, k[1], k[0], self.window_end(k[0], ms.metric.window_ms), *ms.agg.result(state)[:1], n
            )
            for i, ms in enumerate(self.metrics)
            for k, (state, n, _) in ms.windows.items()
            if n and (i, k) not in skip and (known is None or (ms.metric.name, k[1], k[0]) not in known)
        ]

    def forget(self, keys: list[tuple[int, tuple[int, str]]]) -> None:
        """Drop windows whose results are stored."""
        for i, k in keys:
            self.metrics[i].windows.pop(k, None)
            self.metrics[i].rows.pop(k, None)

    def state_bytes(self) -> dict[str, list[int]]:
        """Memory of every open window's state, per metric (for the accuracy benchmark)."""
        return {ms.metric.name: [ms.agg.state_bytes(slot[0]) for slot in ms.windows.values()] for ms in self.metrics}

    def late_counts(self) -> list[tuple[str, int, int]]:
        """The late-event counts not stored yet: (metric, window_start_ms, n)."""
        return [(ms.metric.name, start, n) for ms in self.metrics for start, n in ms.late.items()]

    def clear_late(self) -> None:
        for ms in self.metrics:
            ms.late.clear()

    def first_open_offset(self, exclude: list[tuple[int, tuple[int, str]]] = ()) -> int | None:
        """The smallest offset that still feeds an open window (not in exclude): where a restart re-reads from."""
        skip = set(exclude)
        firsts = [slot[2] for i, ms in enumerate(self.metrics) for k, slot in ms.windows.items() if (i, k) not in skip]
        return min(firsts) if firsts else None

    @property
    def open_windows(self) -> int:
        return sum(len(ms.windows) for ms in self.metrics)
