"""Event-time tumbling windows and the watermark that closes them.

A window is [start, end): start + size in UTC, or counted from local midnight in the dataset's time zone
(``Calendar``). The watermark of a partition is the largest event time seen there; a window of a metric is
closed once ``watermark - allowed_lateness >= window end``. Events for a closed window are late.
This is our own logic, not Faust's windowed tables, because those expire by wall clock and would drop a
replayed day of history within seconds.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

DAY_MS = 86_400_000


def window_start(ts_ms: int, size_ms: int) -> int:
    """Start (epoch ms) of the tumbling window that holds ts_ms."""
    return ts_ms - ts_ms % size_ms


def day_bounds_ms(day: date) -> tuple[int, int]:
    """[start, end) of a UTC day in epoch ms."""
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    return start, start + DAY_MS


def ms_to_datetime(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC)


def parse_day(text: str) -> date:
    """'2026-11-24' -> date, with a message that says what to fix."""
    from batchmark.errors import ConfigError

    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ConfigError(f"date {text!r} is not a day: write it as YYYY-MM-DD, e.g. 2026-11-24") from None


def yesterday() -> date:
    return datetime.now(tz=UTC).date() - timedelta(days=1)


class Calendar:
    """The dataset's days and the windows inside them, in its time zone (``[dataset] timezone``).

    A day is [local midnight, next local midnight): 24 hours, or 23/25 on a DST change. Windows are counted
    from the local midnight: window k of a day is [start + k*size, start + (k+1)*size), and the day holds
    round(day length / size) of them, the last one ending at the day's end. So on a DST change a window that
    divides an hour still lasts its size (there are one more or fewer), and a longer window (6h, 1d) is the one
    whose last window of the day is an hour longer or shorter. In UTC this is plain tumbling windows.
    """

    def __init__(self, zone: str = "UTC") -> None:
        from zoneinfo import ZoneInfo

        self.zone = zone
        self.is_utc = zone in ("UTC", "Etc/UTC", "Z")
        self.tz = UTC if self.is_utc else ZoneInfo(zone)
        self._bounds: dict[date, tuple[int, int]] = {}
        self._current = (0, -1, date.min)  # (start, end, day) of the day window() saw last

    def day_of(self, ts_ms: int) -> date:
        """The local day an instant falls in."""
        return datetime.fromtimestamp(ts_ms / 1000, tz=self.tz).date()

    def day_bounds_ms(self, day: date) -> tuple[int, int]:
        """[start, end) of a local day in epoch ms."""
        found = self._bounds.get(day)
        if found is None:
            if self.is_utc:
                found = day_bounds_ms(day)
            else:
                found = (self._first_instant(day), self._first_instant(day + timedelta(days=1)))
            self._bounds[day] = found
        return found

    def _first_instant(self, day: date) -> int:
        """The first epoch ms whose local date is `day` (midnight, or later where midnight was skipped)."""
        guess = int(datetime(day.year, day.month, day.day, tzinfo=self.tz).timestamp() * 1000)
        lo, hi = guess - 4 * 3_600_000, guess + 4 * 3_600_000  # offsets change by less than 4 h at once
        while lo < hi:  # the smallest ms in [lo, hi] whose local date is >= day
            mid = (lo + hi) // 2
            if self.day_of(mid) >= day:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def window(self, ts_ms: int, size_ms: int) -> tuple[int, int]:
        """[start, end) of the window of `size_ms` that holds ts_ms."""
        if self.is_utc:
            start = ts_ms - ts_ms % size_ms
            return start, start + size_ms
        ds, de, _ = self._current
        if not ds <= ts_ms < de:
            day = self.day_of(ts_ms)
            ds, de = self.day_bounds_ms(day)
            self._current = (ds, de, day)
        return _window_in_day(ts_ms, size_ms, ds, de)

    def window_end(self, start_ms: int, size_ms: int) -> int:
        """The end of the window that starts at start_ms."""
        return self.window(start_ms, size_ms)[1]

    def windows(self, ts_ms: Any, size_ms: int) -> tuple[Any, Any]:
        """window() of every element of an int64 numpy array: (starts, ends)."""
        import numpy as np

        ts = np.asarray(ts_ms, dtype=np.int64)
        if self.is_utc:
            starts = ts - ts % size_ms
            return starts, starts + size_ms
        import pandas as pd

        local = pd.to_datetime(ts, unit="ms", utc=True).tz_convert(self.tz)  # the engine's zoneinfo rules, not pytz
        days, inverse = np.unique(np.asarray(local.date, dtype=object), return_inverse=True)
        bounds = np.array([self.day_bounds_ms(d) for d in days], dtype=np.int64).reshape(-1, 2)
        ds, de = bounds[inverse, 0], bounds[inverse, 1]
        n = np.maximum(1, np.rint((de - ds) / size_ms).astype(np.int64))
        k = np.minimum((ts - ds) // size_ms, n - 1)
        starts = ds + k * size_ms
        return starts, np.where(k == n - 1, de, starts + size_ms)


def _window_in_day(ts_ms: int, size_ms: int, ds: int, de: int) -> tuple[int, int]:
    n = max(1, round((de - ds) / size_ms))
    k = min((ts_ms - ds) // size_ms, n - 1)
    start = ds + k * size_ms
    return start, (de if k == n - 1 else start + size_ms)
