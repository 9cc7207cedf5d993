"""The lake across broker lifetimes: (epoch, partition, offset) identifies a record, and the batch dedupes on it.

Regression: a restarted embedded broker numbers offsets from 0 again; de-duplicating on (partition, offset)
alone dropped real events of the new life of the topic.
"""

from __future__ import annotations

from datetime import date

import pytest

from batchmark import config, spark, storage
from batchmark.definitions import load_definitions
from batchmark.lake import LakeWriter, day_dir
from batchmark.windows import day_bounds_ms

DAY = date(2026, 10, 3)
pytestmark = pytest.mark.timeout(600)


def _event(i: int, t_ms: int) -> dict:
    return {
        "event_id": f"epoch-test-{i}",
        "event_time_ms": t_ms,
        "tenant": "t1",
        "user": "u",
        "job_id": "j",
        "cpu": 1.0,
        "mem_gb": 1.0,
        "duration_s": float(i),
    }


def test_colliding_offsets_of_two_epochs_and_a_relanded_record(pg_url: str) -> None:
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    start, _ = day_bounds_ms(DAY)
    old = LakeWriter(settings.events_lake, defs.dataset, 0, "epochold")
    new = LakeWriter(settings.events_lake, defs.dataset, 0, "epochnew")
    for off in range(5):  # same offsets 0..4 in both lives, different events
        old.add(_event(off, start + 1000 * off), off, 0)
        new.add(_event(100 + off, start + 1000 * off), off, 0)
    old.flush()
    new.flush()
    again = LakeWriter(settings.events_lake, defs.dataset, 0, "epochnew")  # offsets 3..4 landed a second time
    for off in (3, 4):
        again.add(_event(100 + off, start + 1000 * off), off, 0)
    again.flush()

    # a file a crash left half-written keeps its hidden temporary name: it must never be read
    (day_dir(settings.events_lake, DAY) / ".part-epochnew-p0-000000000005-000000000009.parquet.tmp").write_bytes(
        b"PAR1 half a file"
    )
    result = spark.submit(settings, DAY, "epoch-test")
    assert result["lake_records_read"] == 12  # two records were landed twice
    assert result["lake_records"] == 10  # ... and count once; the other epoch's offsets 0..4 are other events
    assert result["truth_events"] == 10
    truth = storage.fetch_results(pg_url, "truth", DAY)
    jobs = [(v, n) for (m, _, _), (v, n) in truth.items() if m == "jobs"]
    assert jobs == [(10.0, 10)]
    cpu = [v for (m, _, _), (v, _) in truth.items() if m == "cpu_seconds"]
    assert cpu == [float(sum(range(5)) + sum(range(100, 105)))]
