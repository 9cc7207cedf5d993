"""Days in the dataset's time zone: local days of 23 and 25 hours, windows inside them, both engines alike."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchmark.batch_compute import window_accuracy
from batchmark.definitions import load_definitions
from batchmark.engine import PartitionState
from batchmark.errors import ConfigError
from batchmark.events import Rejection, validate
from batchmark.lake import LakeWriter, day_completeness, write_watermark
from batchmark.orchestration import day_for_run
from batchmark.windows import Calendar

H = 3_600_000
NY = "America/New_York"
SPRING, AUTUMN = date(2026, 3, 8), date(2026, 11, 1)  # New York's DST changes in 2026

DEFS = f"""
[dataset]
name = "local_days"
partition_key = "key"
timezone = "{NY}"

[dataset.fields]
key = {{ type = "string" }}
x = {{ type = "float" }}
"""
for size in ("30m", "1h", "6h", "1d"):
    for kind, value in (("count", ""), ("sum", 'value = "x"\n'), ("max", 'value = "x"\n')):
        DEFS += f'\n[[metric]]\nname = "{kind}_{size}"\nkind = "{kind}"\n{value}group_by = ["key"]\nwindow = "{size}"\n'


def test_local_days_last_23_and_25_hours_and_utc_days_24() -> None:
    ny = Calendar(NY)
    for day, hours in ((SPRING, 23), (AUTUMN, 25), (date(2026, 6, 1), 24)):
        start, end = ny.day_bounds_ms(day)
        assert (end - start) / H == hours
        assert datetime.fromtimestamp(start / 1000, ZoneInfo(NY)).replace(tzinfo=None) == datetime(*day.timetuple()[:3])
        assert ny.day_of(start) == day and ny.day_of(end - 1) == day and ny.day_of(end) > day
    assert Calendar().day_bounds_ms(SPRING)[1] - Calendar().day_bounds_ms(SPRING)[0] == 24 * H
    # a zone whose clocks skip midnight: the day starts at 01:00, its first instant
    santiago = Calendar("America/Santiago")
    start, end = santiago.day_bounds_ms(date(2026, 9, 6))
    assert santiago.day_of(start - 1) == date(2026, 9, 5) and santiago.day_of(start) == date(2026, 9, 6)
    assert (end - start) / H == 23


@pytest.mark.parametrize(("day", "size_h", "lengths"), [
    (SPRING, 1, [1] * 23),
    (AUTUMN, 1, [1] * 25),
    (SPRING, 6, [6, 6, 6, 5]),  # the last window of the day is shorter by the hour the clocks skip
    (AUTUMN, 6, [6, 6, 6, 7]),
    (SPRING, 24, [23]),  # a one-day window is the local day
    (AUTUMN, 24, [25]),
])  # fmt: skip
def test_windows_count_from_local_midnight_and_end_with_the_day(day: date, size_h: int, lengths: list[int]) -> None:
    ny = Calendar(NY)
    start, end = ny.day_bounds_ms(day)
    ts = np.arange(start, end, 60_000, dtype=np.int64)
    starts, ends = ny.windows(ts, size_h * H)
    windows = sorted(set(zip(starts.tolist(), ends.tolist(), strict=True)))
    assert [(e - s) // H for s, e in windows] == lengths
    assert windows[0][0] == start and windows[-1][1] == end  # they tile the day exactly
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    assert all(ny.window(int(t), size_h * H) == (int(s), int(e)) for t, s, e in zip(ts, starts, ends, strict=True))


def test_utc_calendar_is_plain_tumbling_windows() -> None:
    ts = np.array([0, 59_999, 60_000, 1_790_000_123_456], dtype=np.int64)
    starts, ends = Calendar().windows(ts, 60_000)
    assert starts.tolist() == (ts - ts % 60_000).tolist() and (ends - starts).tolist() == [60_000] * 4


def _events(days: list[date], per_day: int = 600, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    cal = Calendar(NY)
    for day in days:
        start, end = cal.day_bounds_ms(day)
        for i in range(per_day):
            ts = rng.randrange(start, end)
            out.append((ts, i, day))
    out.sort()
    return [
        orjson.dumps({"event_id": f"{d}-{i}", "event_time": ts, "key": f"k{i % 3}", "x": rng.randrange(1000) / 8})
        for ts, i, d in out
    ]


def test_stream_equals_batch_window_by_window_across_both_dst_changes(tmp_path: Path) -> None:
    (tmp_path / "d.toml").write_text(DEFS)
    defs = load_definitions(tmp_path / "d.toml")
    assert defs.dataset.timezone == NY
    days = [date(2026, 3, 7), SPRING, date(2026, 3, 9), date(2026, 10, 31), AUTUMN, date(2026, 11, 2)]
    state = PartitionState(defs)
    events, marks = [], []
    for offset, raw in enumerate(_events(days)):
        event = validate(raw, defs.dataset)
        assert not isinstance(event, Rejection)
        marks.append(state.watermark_ms)
        state.add(event, offset)
        events.append(event)
    state.advance(state.watermark_ms + 2 * 86_400_000)
    results, _ = state.close_ready()
    stream = {(r.metric, r.group_key, r.window_start_ms): (r.value, r.detail) for r in results}
    ends = {(r.metric, r.group_key, r.window_start_ms): r.window_end_ms for r in results}
    pdf = pd.DataFrame(events).assign(_in_lake=True, _copy=0, _in_truth=True, _watermark_ms=marks)
    batch = window_accuracy(pdf, list(defs.metrics), stream, defs.dataset.calendar)
    assert len(batch) == len(stream)
    for row in batch.itertuples():
        key = (row.metric, row.group_key, row.window_start_ms)
        assert row.stream_value == row.value and row.error == 0, row  # bit for bit
        assert row.window_end_ms == ends[key]
    day_rows = batch[batch.metric == "count_1d"]
    lengths = {
        Calendar(NY).day_of(s): (e - s) // H
        for s, e in zip(day_rows.window_start_ms, day_rows.window_end_ms, strict=True)
    }
    assert lengths == {d: {SPRING: 23, AUTUMN: 25}.get(d, 24) for d in days}
    # the per-day counts add up to the events of each local day
    per_day = day_rows.groupby(day_rows.window_start_ms.map(Calendar(NY).day_of)).value.sum()
    assert per_day.to_dict() == {d: 600.0 for d in days}
    hourly = batch[(batch.metric == "count_1h")]
    spring = Calendar(NY).day_bounds_ms(SPRING)
    assert hourly[hourly.window_start_ms.between(spring[0], spring[1] - 1)].window_start_ms.nunique() == 23


def test_the_lake_partitions_by_local_day_and_a_day_is_complete_after_its_local_end(tmp_path: Path) -> None:
    (tmp_path / "d.toml").write_text(DEFS)
    defs = load_definitions(tmp_path / "d.toml")
    writer = LakeWriter(tmp_path / "lake", defs.dataset, 0, "e1")
    late_evening = int(datetime(2026, 3, 8, 3, 30, tzinfo=UTC).timestamp() * 1000)  # 22:30 on the 7th in New York
    writer.add({"event_id": "a", "event_time_ms": late_evening, "key": "k", "x": 1.0}, 0, 0)
    [path] = writer.flush()
    assert path.parent.name == "date=2026-03-07"
    assert pq.read_table(path).column("event_id").to_pylist() == ["a"]
    _, end = defs.dataset.calendar.day_bounds_ms(SPRING)
    _, utc_end = Calendar().day_bounds_ms(SPRING)
    write_watermark(tmp_path / "lake", "t", 0, utc_end, 1)  # 20:00 on the 8th in New York
    assert day_completeness(tmp_path / "lake", "t", SPRING, 1, 0)[0]  # a UTC day would be over
    assert not day_completeness(tmp_path / "lake", "t", SPRING, 1, 0, defs.dataset.calendar)[0]  # the local one not
    write_watermark(tmp_path / "lake", "t", 0, end, 2)
    assert day_completeness(tmp_path / "lake", "t", SPRING, 1, 0, defs.dataset.calendar)[0]


def test_the_nightly_run_checks_the_local_day_that_ended() -> None:
    local_midnight = datetime(2026, 3, 7, 0, 0, tzinfo=ZoneInfo(NY))  # the run's data interval starts here
    assert day_for_run(None, local_midnight.astimezone(UTC), zone=NY) == date(2026, 3, 7)
    assert day_for_run(None, local_midnight.astimezone(UTC), zone="UTC") == date(2026, 3, 7)
    after = datetime(2026, 3, 9, 3, 0, tzinfo=UTC)  # 23:00 on the 8th in New York
    assert day_for_run(None, None, after, zone=NY) == date(2026, 3, 7)
    assert day_for_run(None, None, after, zone="UTC") == date(2026, 3, 8)


def test_an_unknown_time_zone_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.toml").write_text(DEFS.replace(NY, "America/Gotham"))
    with pytest.raises(ConfigError, match="timezone 'America/Gotham' is not an IANA time zone name"):
        load_definitions(tmp_path / "d.toml")
