"""The batch's archive reader: byte ranges read in parallel give back every line exactly once, as raw bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from batchmark.batch_compute import line_ranges, read_line_range


def _lines_of(path: Path, chunk: int) -> list[bytes]:
    ranges = line_ranges(path, chunk)
    assert ranges[0][1] == 0 and ranges[-1][2] == path.stat().st_size
    assert all(a[2] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, no gap or overlap
    return [line for p, s, e in ranges for line in read_line_range(p, s, e)]


@pytest.mark.parametrize("seed", range(6))
def test_every_line_once_whatever_the_chunk_size(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(400):
        n = rng.choice([0, 1, 2, 5, 40, 300, 5000])  # empty lines, tiny ones and lines longer than a chunk
        body = bytes(rng.randrange(32, 127) for _ in range(n)) if n else b""
        if i % 37 == 0:
            body += b"\xff\xfe not utf-8"  # must come back byte for byte
        lines.append(body)
    ends = [rng.choice([b"\n", b"\r\n"]) for _ in lines]
    data = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    if seed % 2:  # no newline after the last line
        data = data.rstrip(b"\r\n")
    path = tmp_path / "archive.jsonl"
    path.write_bytes(data)
    expected = [line for line in lines if line]
    for chunk in (97, 1000, 4999, 5001, 65_536, len(data) - 1, len(data), 10 * len(data)):
        assert _lines_of(path, chunk) == expected, chunk


def test_one_byte_chunks(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 22}\r\n\xff\n{"c": 333}')
    assert _lines_of(path, 1) == [b'{"a": 1}', b'{"b": 22}', b"\xff", b'{"c": 333}']
    assert _lines_of(path, 2) == _lines_of(path, 1)


def test_an_empty_archive_has_no_lines(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert _lines_of(path, 10) == []


# --- the vectorized window computation against the per-window one it replaced (kept here as the oracle) ---

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from batchmark.aggregates import BinPacking, Quantile, TopK, rank_error  # noqa: E402
from batchmark.batch_compute import ACCURACY_COLUMNS, TRUTH_COLUMNS, group_keys, window_accuracy  # noqa: E402
from batchmark.config import REPO_ROOT  # noqa: E402
from batchmark.definitions import load_definitions  # noqa: E402


def _previous_window_accuracy(pdf: pd.DataFrame, metrics: list, stream: dict) -> pd.DataFrame:
    """The per-record implementation the Spark job ran before it was vectorized: every subset a Python list."""

    def value_of(agg, values):  # noqa: ANN001, ANN202
        if not values and agg.kind not in ("count", "sum", "distinct", "topk", "binpack"):
            return None, None
        return agg.exact(values)

    def diff(a, b):  # noqa: ANN001, ANN202
        return None if a is None or b is None else a - b

    def detail(agg, s_value, s_detail, truth, seen):  # noqa: ANN001, ANN202
        if isinstance(agg, TopK):
            return agg.recall(s_detail, truth)
        if isinstance(agg, Quantile) and seen:
            return {"sketch_rank_error": rank_error(s_value, sorted(seen), agg.q)}
        if isinstance(agg, BinPacking):
            lower = agg.exact(truth)[1]["lower_bound"]
            return {"ff_over_lower_bound": s_value / lower if lower else None, "lower_bound": lower}
        return {}

    rows = []
    ts = pdf["event_time_ms"].to_numpy(dtype="int64")
    in_lake = pdf["_in_lake"].to_numpy(dtype=bool)
    first_copy = in_lake & (pdf["_copy"].to_numpy() == 0)
    in_truth = pdf["_in_truth"].to_numpy(dtype=bool)
    watermark = pdf["_watermark_ms"].to_numpy(dtype="int64")
    for m in metrics:
        agg = m.aggregate
        starts = ts - ts % m.window_ms
        late = in_lake & (watermark - m.allowed_lateness_ms >= starts + m.window_ms)
        values = (m.value_fn(pdf) if m.value_fn is not None else pd.Series(1.0, index=pdf.index)).tolist()
        keys = group_keys(pdf, m.group_by).tolist()
        windows: dict = {}
        for i, wk in enumerate(zip(starts.tolist(), keys, strict=True)):
            windows.setdefault(wk, []).append(i)
        for (start, key), idx in sorted(windows.items()):
            truth = [values[i] for i in idx if in_truth[i]]
            if not truth:
                continue
            first = [values[i] for i in idx if first_copy[i]]
            landed = [values[i] for i in idx if in_lake[i]]
            seen = [values[i] for i in idx if in_lake[i] and not late[i]]
            v_truth, d_truth = agg.exact(truth)
            v_first, v_landed, v_seen = value_of(agg, first)[0], value_of(agg, landed)[0], value_of(agg, seen)[0]
            s_value, s_detail = stream.get((m.name, key, start), (None, None))
            error = acc = None
            if s_value is not None:
                error = agg.error(s_value, s_detail, truth)
                acc = detail(agg, s_value, s_detail, truth, seen)
            rows.append(
                (m.name, key, start, start + m.window_ms, float(v_truth), len(truth),
                 json.dumps(d_truth) if d_truth is not None else None, s_value, error,
                 len(truth) - len(first), len(landed) - len(first), len(landed) - len(seen),
                 diff(v_first, v_truth), diff(v_landed, v_first), diff(v_seen, v_landed), diff(s_value, v_seen),
                 json.dumps(acc) if acc else None)
            )  # fmt: skip
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS + ACCURACY_COLUMNS)


def _flagged_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    t0 = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000
    times = np.sort(rng.integers(t0, t0 + 3 * 3_600_000, size=n))
    tenants = rng.choice(["tenant-00", "tenant-01", "t|x"], size=n, p=[0.6, 0.3, 0.1])
    pdf = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "event_time_ms": times,
            "tenant": tenants,
            "user": [f"user-{u}" for u in rng.zipf(1.5, size=n) % 50],
            "job_id": [f"job-{i}" for i in range(n)],
            "cpu": rng.choice([0.25, 0.5, 1.0, 2.0, 16.0], size=n),
            "mem_gb": rng.choice([0.5, 1.0, 4.0, 16.0, 64.0, 100.0, 200.0], size=n),
            "duration_s": np.round(rng.lognormal(4.0, 1.2, size=n)).clip(1, 2_592_000) + rng.choice([0, 0.1], size=n),
        }
    )
    kind = rng.random(n)
    pdf["_in_lake"] = kind >= 0.05  # 5% only in the archive (lost)
    pdf["_copy"] = np.where((kind >= 0.05) & (kind < 0.08), 1, 0)  # 3% second copies
    pdf["_in_truth"] = (pdf["_copy"] == 0) & (kind < 0.99)  # 1% landed but not in the archive
    watermark = times - rng.integers(0, 10_000, size=n)
    pdf["_watermark_ms"] = np.where(kind > 0.97, times + 200_000, watermark)  # 3% arrive late
    return pdf.sample(frac=1.0, random_state=int(rng.integers(1000))).reset_index(drop=True)  # any row order


def _normalized(df: pd.DataFrame) -> list[tuple]:
    def norm(v):  # noqa: ANN001, ANN202
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, str) and v.startswith(("{", "[")):
            return json.loads(v)
        return repr(v) if isinstance(v, float) else v  # floats compared bit for bit

    return sorted(tuple(norm(v) for v in row) for row in df.itertuples(index=False, name=None))


@pytest.mark.parametrize("seed", range(4))
def test_vectorized_windows_equal_the_per_window_computation(seed: int) -> None:
    defs = load_definitions(REPO_ROOT / "batchmark" / "metrics.toml")
    rng = np.random.default_rng(seed)
    pdf = _flagged_frame(rng, 4000)
    metrics = list(defs.metrics)
    truth = _previous_window_accuracy(pdf, metrics, {})
    stream = {}
    for row in truth.itertuples():  # the stream: a value for most windows, near the truth or off
        if rng.random() < 0.8:
            value = row.value * float(rng.choice([1.0, 1.0, 0.98, 1.3]))
            detail = json.loads(row.detail) if row.detail else None
            if detail and "items" in detail and rng.random() < 0.5:
                detail = {"items": detail["items"][1:]}
            stream[(row.metric, row.group_key, row.window_start_ms)] = (value, detail)
    want = _previous_window_accuracy(pdf, metrics, stream)
    got = window_accuracy(pdf, metrics, stream)
    assert len(got) == len(want) > 200
    assert got["stream_value"].notna().sum() == len(stream)
    assert (got["n_lost"] > 0).any() and (got["n_dup"] > 0).any() and (got["n_late"] > 0).any()
    assert _normalized(got) == _normalized(want)
