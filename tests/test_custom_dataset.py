"""A user's own dataset (examples/taxi): one definitions file, no code, and both engines agree on it.

Replays the example CSV through the core's validation and stream engine, and computes the batch side with
the same function the Spark job runs, on the same records.
"""

from __future__ import annotations

import math

import orjson
import pandas as pd

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
