"""The replayer reads JSONL byte for byte, and CSV and Parquet as JSON records, in file order."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchmark.replay import read_records

ROWS = [
    {"event_id": "a", "event_time": "2026-11-24T00:00:01Z", "tenant": "t1", "cpu": 2.0, "n": 3},
    {"event_id": "b", "event_time": "2026-11-24T00:00:02Z", "tenant": "t2", "cpu": 0.5, "n": 4},
]


def test_jsonl_is_sent_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [orjson.dumps(ROWS[0]), b'{"broken": ', b"\xff not utf8"]
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    assert list(read_records(path)) == lines


def test_csv_rows_become_typed_json(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "event_id,event_time,tenant,cpu,n\n"
        + "\n".join(f"{r['event_id']},{r['event_time']},{r['tenant']},{r['cpu']},{r['n']}" for r in ROWS)
        + "\n"
    )
    assert [orjson.loads(r) for r in read_records(path)] == ROWS


def test_parquet_rows_become_json(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert [orjson.loads(r) for r in read_records(path)] == ROWS
