"""A user's own dataset (examples/taxi): one definitions file, no code, and both engines agree on it.

Replays the example CSV through the core's validation and stream engine, and computes the batch side with
the same function the Spark job runs, on the same records.
"""

from __future__ import annotations

import math

import orjson
import pandas as pd
import pytest

from batchmark.batch_compute import window_accuracy
from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from batchmark.engine import PartitionState
from batchmark.events import Rejection, validate
from batchmark.replay import read_records

EXAMPLE = REPO_ROOT / "examples" / "taxi"


def test_csv_cells_follow_the_schema_types(tmp_path) -> None:  # noqa: ANN001
    defs = load_definitions(EXAMPLE / "metrics.toml")
    path = tmp_path / "r.csv"
    path.write_text("ride_id,pickup_time,zone,driver,fare,distance_km\n7,2026-11-24T00:00:00Z,12,3,10,2\n")
    [rec] = [orjson.loads(r) for r in read_records(path, defs.dataset)]
    assert rec == {
        "ride_id": "7",
        "pickup_time": "2026-11-24T00:00:00Z",
        "zone": "12",
        "driver": "3",
        "fare": 10.0,
        "distance_km": 2.0,
    }
    assert not isinstance(validate(orjson.dumps(rec), defs.dataset), Rejection)


def test_taxi_rides_stream_equals_batch() -> None:
    defs = load_definitions(EXAMPLE / "metrics.toml")
    state = PartitionState(defs)
    events, watermarks = [], []
    for offset, raw in enumerate(read_records(EXAMPLE / "rides.csv", defs.dataset)):
        event = validate(raw, defs.dataset)
        assert not isinstance(event, Rejection), event
        watermarks.append(state.watermark_ms)
        state.add(event, offset)
        events.append(event)
    assert len(events) == 2000 and {e["event_id"] for e in events} == {f"r{i:05d}" for i in range(2000)}
    state.advance(state.watermark_ms + 86_400_000)
    results, _ = state.close_ready()
    stream = {(r.metric, r.group_key, r.window_start_ms): (r.value, r.detail) for r in results}

    pdf = pd.DataFrame(events).assign(_in_lake=True, _copy=0, _in_truth=True, _watermark_ms=watermarks)
    batch = window_accuracy(pdf, list(defs.metrics), stream)
    assert len(batch) == len(stream) > 100
    kinds = {m.name: m for m in defs.metrics}
    for row in batch.itertuples():
        m = kinds[row.metric]
        if m.kind in ("count", "sum"):
            assert row.stream_value == row.value and row.error == 0  # bit for bit
        else:
            assert row.error <= m.tolerance or math.isclose(row.error, m.tolerance)
        assert row.sketch_effect == row.stream_value - row.value  # no late, duplicate or lost rides here


def test_a_zero_divisor_gives_no_value_in_either_engine_and_stops_no_worker() -> None:
    """The taxi example's fare_per_km_sum is fare / distance_km and a ride may have gone 0 km (a cancelled one):
    once that raised ZeroDivisionError in the worker, which stopped, and a restart met the same ride again. Now
    such a ride has no value for the metric, like a null: both engines skip it (and only for that metric)."""
    from batchmark.definitions import compile_value
    from batchmark.errors import ConfigError

    defs = load_definitions(EXAMPLE / "metrics.toml")
    start = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000
    rides = []
    for i in range(300):
        distance = 0.0 if i % 7 == 0 else (i % 11) / 2 + 0.5  # every 7th ride went nowhere
        fare = 0.0 if i % 21 == 0 else 3.0 + i % 13  # some of them free as well: 0 / 0
        rides.append({"ride_id": f"z{i}", "pickup_time": start + i * 20_000, "zone": f"z{i % 3}",
                      "driver": f"d{i % 17}", "fare": fare, "distance_km": distance})  # fmt: skip
    records = [orjson.dumps(r) for r in rides]
    events, stream, counts, batch = _stream_and_batch(defs, records)

    by_metric = batch.set_index(["metric", "group_key", "window_start_ms"])
    per_km = {k: v for k, v in stream.items() if k[0] == "fare_per_km_sum"}
    assert per_km and all(math.isfinite(v) for v, _ in per_km.values())
    for key, (value, _) in per_km.items():
        assert by_metric.loc[key, "value"] == value and by_metric.loc[key, "error"] == 0  # bit for bit
    went = [r for r in rides if r["distance_km"] != 0]
    assert sum(n for k, n in counts.items() if k[0] == "fare_per_km_sum") == len(went) < len(rides)
    assert sum(n for k, n in counts.items() if k[0] == "rides") == len(rides)  # the ride itself counts
    want: dict[tuple[str, int], list[float]] = {}
    for r in went:
        want.setdefault((r["zone"], r["pickup_time"] - r["pickup_time"] % 900_000), []).append(
            r["fare"] / r["distance_km"]
        )
    assert {(k[1], k[2]): v for k, (v, _) in per_km.items()} == {k: math.fsum(v) for k, v in want.items()}

    # the batched stream path (the worker's) agrees with the per-event one and does not raise either
    batched = PartitionState(defs)
    batched.add_batch(events, list(range(len(events))))
    batched.advance(batched.watermark_ms + 86_400_000)
    assert {(r.metric, r.group_key, r.window_start_ms): r.value for r in batched.close_ready()[0]} == {
        k: v for k, (v, _) in stream.items()
    }
    # NaN carries through the rest of an expression; a literal 0 divisor is refused when the file is read
    fn, _ = compile_value("fare / distance_km * 2 + 1", {"fare", "distance_km"})
    assert math.isnan(fn({"fare": 1.0, "distance_km": 0})) and fn({"fare": 1.0, "distance_km": 2}) == 2.0
    for divisor in ("0", "-0", "-0.0", "(1 - 1)", "(2 - 2) * 3", "(1 / 0)"):  # the batch met a scalar here
        with pytest.raises(ConfigError, match="divides by 0"):
            compile_value(f"(fare + 1) / {divisor}", {"fare"})
    with pytest.raises(ConfigError, match="names no field"):
        compile_value("2 / 3", {"fare"})
    assert compile_value("fare / (1 - 0.5)", {"fare"})[0]({"fare": 3.0}) == 6.0


NULLS_DEFS = """
[dataset]
name = "nulls"
event_id = "row_id"
event_time = "at"
partition_key = "key"

[dataset.fields]
key = { type = "string", max_length = 8 }
s = { type = "string", max_length = 8, nullable = true }
f = { type = "float", min = 0.0, max = 100.0, nullable = true }
i = { type = "int", min = 0, max = 1000, nullable = true }

[dataset.csv]
id_from = ["key", "day", "clock"]
time_from = ["day", "clock"]
time_format = "%Y-%m-%d %H:%M:%S"
time_zone = "America/New_York"

[[metric]]
name = "rows"
kind = "count"
group_by = ["key"]
window = "1h"

[[metric]]
name = "rows_without_f"
kind = "count"
where = "f is null"
group_by = ["key"]
window = "1h"

[[metric]]
name = "f_sum"
kind = "sum"
value = "f * 2"
group_by = ["key"]
window = "1h"

[[metric]]
name = "i_mean"
kind = "mean"
value = "i"
group_by = ["key"]
window = "1h"

[[metric]]
name = "f_min"
kind = "min"
value = "f"
group_by = ["key"]
window = "1h"

[[metric]]
name = "i_max"
kind = "max"
value = "i + f"
group_by = ["key"]
window = "1h"

[[metric]]
name = "s_distinct"
kind = "distinct"
field = "s"
group_by = ["key"]
window = "1h"

[[metric]]
name = "i_top"
kind = "topk"
field = "i"
k = 3
group_by = ["key"]
window = "1h"

[[metric]]
name = "f_p90"
kind = "quantile"
value = "f"
q = 0.9
group_by = ["key"]
window = "1h"

[[metric]]
name = "f_pack"
kind = "binpack"
value = "f"
capacity = 100.0
group_by = ["key"]
window = "1h"
"""


def _nulls_csv(path, n: int = 1500, seed: int = 3) -> list[dict]:  # noqa: ANN001
    """Rows across New York's spring DST change (2026-03-08 02:00 local), written as local date and clock columns,
    with nulls (empty cells and NA) in every nullable field and a column no field declares."""
    import random
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    rng = random.Random(seed)
    ny = ZoneInfo("America/New_York")
    start_ms = int(datetime(2026, 3, 8, 3, 0, tzinfo=UTC).timestamp() * 1000)  # 22:00 EST on the 7th
    rows, lines = [], ["key,day,clock,s,f,i,comment"]
    for r in range(n):
        ts = start_ms + r * 23_000
        local = datetime.fromtimestamp(ts / 1000, UTC).astimezone(ny)
        row = {
            "key": rng.choice(["a", "b", "c"]),
            "at": ts - ts % 1000,
            "s": rng.choice([None, "x", "y", "z", "w"]),
            "f": rng.choice([None, round(rng.uniform(0, 100), 2)]),
            "i": rng.choice([None, rng.randrange(12)]),  # few values: top items repeat,
        }
        cell = {k: (rng.choice(["", "NA"]) if v is None else str(v)) for k, v in row.items()}
        day, clock = local.strftime("%Y-%m-%d"), local.strftime("%H:%M:%S")
        lines.append(f"{cell['key']},{day},{clock},{cell['s']},{cell['f']},{cell['i']},note {r}")
        rows.append(row)
    path.write_text("\n".join(lines) + "\n")
    return rows


def _stream_and_batch(defs, records: list[bytes]):  # noqa: ANN001, ANN202
    """Both engines on the same records: the stream engine in-process, the batch function the Spark job runs."""
    state = PartitionState(defs)
    events, watermarks = [], []
    for offset, raw in enumerate(records):
        event = validate(raw, defs.dataset)
        assert not isinstance(event, Rejection), event
        watermarks.append(state.watermark_ms)
        state.add(event, offset)
        events.append(event)
    state.advance(state.watermark_ms + max(m.allowed_lateness_ms for m in defs.metrics) + 86_400_000)
    results, _ = state.close_ready()
    stream = {(r.metric, r.group_key, r.window_start_ms): (r.value, r.detail) for r in results}
    counts = {(r.metric, r.group_key, r.window_start_ms): r.n_events for r in results}
    pdf = pd.DataFrame(events).assign(_in_lake=True, _copy=0, _in_truth=True, _watermark_ms=watermarks)
    return events, stream, counts, window_accuracy(pdf, list(defs.metrics), stream, defs.dataset.calendar)


def test_nulls_na_tokens_extra_columns_derived_ids_and_local_time_across_dst(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "defs.toml").write_text(NULLS_DEFS)
    defs = load_definitions(tmp_path / "defs.toml")
    rows = _nulls_csv(tmp_path / "nulls.csv")
    events, stream, counts, batch = _stream_and_batch(defs, list(read_records(tmp_path / "nulls.csv", defs.dataset)))
    # the local clock (23:00 EST ... past 03:00 EDT) came back as the UTC instants the rows were written from
    assert [e["event_time_ms"] for e in events] == [r["at"] for r in rows]
    assert [(e["s"], e["f"], e["i"]) for e in events] == [(r["s"], r["f"], r["i"]) for r in rows]
    assert len({e["event_id"] for e in events}) == len(rows) and "comment" not in events[0]
    # every window of every metric on both sides, and nothing else: a window a metric read nothing in has no row
    assert len(batch) == len(stream) and set(
        zip(batch.metric, batch.group_key, batch.window_start_ms, strict=True)
    ) == set(stream)
    by = {name: batch[batch.metric == name] for name in batch.metric.unique()}
    assert by["rows"].n_events.sum() == len(rows)
    assert by["rows_without_f"].value.sum() == sum(r["f"] is None for r in rows) > 100
    assert by["i_mean"].n_events.sum() == sum(r["i"] is not None for r in rows)
    assert by["i_max"].n_events.sum() == sum(r["i"] is not None and r["f"] is not None for r in rows)
    assert by["s_distinct"].n_events.sum() == sum(r["s"] is not None for r in rows)
    for key, n in counts.items():
        assert batch.set_index(["metric", "group_key", "window_start_ms"]).loc[key, "n_events"] == n
    kinds = {m.name: m for m in defs.metrics}
    for row in batch.itertuples():
        m = kinds[row.metric]
        if m.kind in ("count", "sum", "mean", "min", "max"):
            assert row.stream_value == row.value and row.error == 0, row  # bit for bit
        else:
            assert row.error <= m.tolerance or math.isclose(row.error, m.tolerance), row
    # an independent check of one exact kind: the sum of f * 2 per (key, hour), nulls skipped
    want: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["f"] is not None:
            want.setdefault((r["key"], r["at"] - r["at"] % 3_600_000), []).append(r["f"] * 2)
    got = {(k, s): v for k, s, v in by["f_sum"][["group_key", "window_start_ms", "value"]].itertuples(index=False)}
    assert got == {k: math.fsum(v) for k, v in want.items()}


def test_id_collisions_are_refused_before_anything_is_sent(tmp_path) -> None:  # noqa: ANN001
    from batchmark.errors import ConfigError

    (tmp_path / "defs.toml").write_text(NULLS_DEFS)
    defs = load_definitions(tmp_path / "defs.toml")
    path = tmp_path / "c.csv"
    header = "key,day,clock,s,f,i\n"
    path.write_text(header + "a,2026-03-08,01:00:00,x,1,1\na,2026-03-08,01:00:00,x,1,1\n")
    assert len(list(read_records(path, defs.dataset))) == 2  # identical rows: duplicates, the batch keeps one
    # rows that become the same record are duplicates, not a collision: a column no field reads, null spelt twice
    path.write_text("key,day,clock,s,f,i,comment\na,2026-03-08,01:00:00,x,,1,one\na,2026-03-08,01:00:00,x,NA,1,two\n")
    assert len(set(read_records(path, defs.dataset))) == 1
    path.write_text(header + "a,2026-03-08,01:00:00,x,1,1\na,2026-03-08,01:00:00,y,1,1\n")
    with pytest.raises(ConfigError, match="lines 2 and 3 have the same id_from cells"):
        next(read_records(path, defs.dataset))
    path.write_text("key,day,s,f,i\n")
    with pytest.raises(ConfigError, match="has no column 'clock'"):
        next(read_records(path, defs.dataset))


def test_local_times_across_both_dst_changes() -> None:
    from batchmark.csv_source import parse_local_time

    fmt, ny = "%Y-%m-%d %H:%M", "America/New_York"
    # spring: 02:30 does not exist; it is read with the offset before the change (EST), i.e. 07:30 UTC
    assert parse_local_time("2026-03-08 02:30", fmt, ny) == parse_local_time("2026-03-08T07:30:00+00:00", None, None)
    assert parse_local_time("2026-03-08 03:30", fmt, ny) - parse_local_time("2026-03-08 01:30", fmt, ny) == 3_600_000
    # autumn: 01:30 happens twice; the first (EDT) is taken
    assert parse_local_time("2026-11-01 01:30", fmt, ny) == parse_local_time("2026-11-01T05:30:00+00:00", None, None)
    assert parse_local_time("not a time", fmt, ny) == "not a time"  # left as text: validation rejects it


def test_la_riots_a_real_dataset_from_vega_datasets() -> None:
    """vega_datasets 0.9.0 ships la-riots.csv (63 rows): no id column, a null age, undeclared columns, local dates."""
    from pathlib import Path

    import vega_datasets

    defs = load_definitions(REPO_ROOT / "examples" / "la_riots" / "metrics.toml")
    path = Path(vega_datasets.__file__).parent / "_data" / "la-riots.csv"
    frame = pd.read_csv(path)
    events, stream, counts, batch = _stream_and_batch(defs, list(read_records(path, defs.dataset)))
    assert len(events) == len(frame) == 63
    by = {
        name: batch[batch.metric == name].set_index(["group_key", "window_start_ms"]) for name in batch.metric.unique()
    }
    assert by["deaths"].value.sum() == 63 and by["age_unknown"].value.sum() == frame.age.isna().sum() == 1
    assert by["age_mean"].n_events.sum() == 62  # the unknown age is skipped, not counted as 0
    # an independent computation from the file: deaths per type on 1992-04-30, a Los Angeles day (a 1d window
    # starts at its local midnight, 07:00 UTC)
    start = int(pd.Timestamp("1992-04-30", tz="America/Los_Angeles").timestamp() * 1000)
    per_type = frame[frame.death_date == "1992-04-30"].groupby("type").size()
    for t, n in per_type.items():
        assert by["deaths"].loc[(t, start), "value"] == n
    ages = frame[(frame.death_date == "1992-04-30") & (frame.type == "Homicide")].age.dropna()
    assert by["age_mean"].loc[("Homicide", start), "value"] == math.fsum(ages) / len(ages)
    assert by["age_max"].loc[("Homicide", start), "value"] == ages.max()
    for row in batch.itertuples():
        if row.metric in ("deaths", "age_unknown", "age_mean", "age_max"):
            assert row.stream_value == row.value and row.error == 0
        else:  # a median of a few ages and distinct neighborhoods: on so few values the sketches are exact
            assert row.error < 1e-6, row  # (HLL's estimate of a small count is exact up to float rounding)
