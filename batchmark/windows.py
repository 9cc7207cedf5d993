"""Event-time tumbling windows and the watermark that closes them.

A window is [start, start + size). The watermark of a partition is the largest event time seen there; a window
of a metric is closed once ``watermark - allowed_lateness >= window end``. Events for a closed window are late.
This is our own logic, not Faust's windowed tables, because those expire by wall clock and would drop a
replayed day of history within seconds.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

DAY_MS = 86_400_000


def window_start(ts_ms: int, size_ms: int) -> int:
    """Start (epoch ms) of the tumbling window that holds ts_ms."""
    return ts_ms - ts_ms % size_ms


def is_closed(start_ms: int, size_ms: int, lateness_ms: int, watermark_ms: int) -> bool:
    """True when no more events are accepted for the window starting at start_ms."""
    return watermark_ms - lateness_ms >= start_ms + size_ms


def day_of(ts_ms: int) -> date:
    """UTC calendar day of an epoch-ms timestamp (the lake partition an event lands in)."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).date()


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
