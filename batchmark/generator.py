"""Synthetic events for the default domain: jobs submitted by tenants to a shared compute cluster.

Writes a JSONL file in *arrival order* (the order a replay sends them), with configurable shares of
out-of-order, late, duplicated, malformed and lost records, and a manifest beside it that states how many of
each it wrote, so tests and the accuracy report can check attribution against known truth. Optionally writes
the archive too: the system of record, every valid event once (lost ones included), as the batch's truth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import orjson

from batchmark.windows import day_bounds_ms, ms_to_datetime

CPUS = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
MEMS = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])

# One example per class of malformed record; the generator cycles through them.
MALFORMED = (
    ("invalid_json", lambda r: orjson.dumps(r)[:-7]),
    ("wrong_type", lambda r: orjson.dumps({**r, "cpu": "four"})),
    ("missing_field", lambda r: orjson.dumps({k: v for k, v in r.items() if k != "tenant"})),
    ("not_finite", lambda r: orjson.dumps(r).replace(b'"mem_gb":', b'"mem_gb":NaN,"x":')),
    ("out_of_range", lambda r: orjson.dumps({**r, "duration_s": -5.0})),
    ("unknown_field", lambda r: orjson.dumps({**r, "color": "blue"})),
    ("bad_event_time", lambda r: orjson.dumps({**r, "event_time": "yesterday"})),
    ("invalid_utf8", lambda r: orjson.dumps(r).replace(b'"user":"', b'"user":"\xff\xfe')),
)


@dataclass
class GeneratorConfig:
    """What to generate; every share is a fraction of `events`."""

    day: date
    events: int = 100_000
    tenants: int = 8
    users_per_tenant: int = 500
    skew: float = 1.2  # Zipf exponent of tenant and user popularity (0 = uniform)
    out_of_order: float = 0.0  # delayed, but within the allowed lateness
    late: float = 0.0  # delayed past the window end plus the allowed lateness
    duplicates: float = 0.0  # the same event (same id) sent a second time, soon after
    malformed: float = 0.0  # records that fail validation (cycling through MALFORMED)
    lost: float = 0.0  # in the archive (the system of record) but never sent to the stream
    lateness_ms: int = 30_000  # the allowed lateness late events must exceed
    window_ms: int = 60_000  # the window used to tell which records arrive late
    partitions: int = 2  # watermarks are per partition: the replay keys by tenant with Kafka's partitioner
    seed: int = 7


@dataclass
class Manifest:
    """What a generated file contains, by construction (late: by simulating the stream's watermark rule)."""

    day: str
    records: int
    valid_events: int  # valid records sent, duplicate copies included
    distinct_events: int  # valid events sent, each once
    out_of_order: int
    late: int  # valid records (copies too) that arrive after their window closed
    duplicates: int  # extra copies sent
    malformed: int
    lost: int = 0
    archive: str | None = None
    malformed_by_reason: dict[str, int] = field(default_factory=dict)
    late_event_ids: list[str] = field(default_factory=list)  # one entry per late record (a copy may be late)
    duplicate_event_ids: list[str] = field(default_factory=list)  # one entry per extra copy
    lost_event_ids: list[str] = field(default_factory=list)  # in the archive, never sent
    malformed_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number from 0, reason)


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def generate(cfg: GeneratorConfig, out: Path, archive: Path | None = None) -> Manifest:
    """Write cfg.events events of cfg.day (plus duplicates) to `out` as JSONL; return the manifest.

    With `archive`, also write the system of record there: every valid event once, lost ones included.
    """
    rng = np.random.default_rng(cfg.seed)
    start, end = day_bounds_ms(cfg.day)
    n = cfg.events
    times = np.sort(rng.integers(start, end, size=n))
    tenant_ix = rng.choice(cfg.tenants, size=n, p=_zipf_weights(cfg.tenants, cfg.skew))
    user_ix = rng.choice(cfg.users_per_tenant, size=n, p=_zipf_weights(cfg.users_per_tenant, cfg.skew))
    cpu = rng.choice(CPUS, size=n)
    mem = rng.choice(MEMS, size=n)
    duration = np.round(rng.lognormal(4.0, 1.2, size=n)).clip(1, 2_592_000)

    # arrival = event time + delay; late delays exceed window + lateness, so the window is usually closed
    delay = np.zeros(n, dtype=np.int64)
    kinds = rng.random(n)
    ooo = kinds < cfg.out_of_order
    late = (kinds >= cfg.out_of_order) & (kinds < cfg.out_of_order + cfg.late)
    delay[ooo] = rng.integers(1, max(2, int(cfg.lateness_ms * 0.8)), size=int(ooo.sum()))
    late_min = cfg.window_ms + cfg.lateness_ms + 1_000
    delay[late] = rng.integers(late_min, late_min + 300_000, size=int(late.sum()))
    late &= times + delay < end  # stay inside the day
    delay[~late & ~ooo] = 0

    events = [
        {
            "event_id": f"{cfg.day.isoformat()}-{i:09d}",
            "event_time": ms_to_datetime(int(times[i])).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "tenant": f"tenant-{tenant_ix[i]:02d}",
            "user": f"user-{tenant_ix[i]:02d}-{user_ix[i]:05d}",
            "job_id": f"job-{i:09d}",
            "cpu": float(cpu[i]),
            "mem_gb": float(mem[i]),
            "duration_s": float(duration[i]),
        }
        for i in range(n)
    ]
    arrivals = [(int(times[i] + delay[i]), i) for i in range(n)]
    dup_ix = np.flatnonzero(rng.random(n) < cfg.duplicates)
    for i in dup_ix:  # the copy arrives soon after the original
        arrivals.append((arrivals[i][0] + int(rng.integers(1, max(2, cfg.lateness_ms // 2))), int(i)))
    taken = set(dup_ix.tolist())
    mal_ix = set(np.flatnonzero(rng.random(n) < cfg.malformed).tolist()) - taken
    lost_ix = set(np.flatnonzero(rng.random(n) < cfg.lost).tolist()) - taken - mal_ix
    arrivals.sort()

    manifest = Manifest(
        day=cfg.day.isoformat(),
        records=0,
        valid_events=0,
        distinct_events=0,
        out_of_order=0,
        late=0,
        duplicates=len(dup_ix),
        malformed=0,
        lost=len(lost_ix),
        lost_event_ids=[events[i]["event_id"] for i in sorted(lost_ix)],
    )
    seen: set[int] = set()
    # the stream's rule, simulated per partition: late = the window was closed when the record arrived
    from aiokafka.partitioner import DefaultPartitioner

    partitioner, parts = DefaultPartitioner(), list(range(cfg.partitions))
    tenant_partition = {t: partitioner(f"tenant-{t:02d}".encode(), parts, parts) for t in range(cfg.tenants)}
    watermarks = dict.fromkeys(parts, -(2**62))
    cycle = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        for _, i in arrivals:
            if i in lost_ix:
                continue
            rec = events[i]
            first_copy = i not in seen
            seen.add(i)
            manifest.records += 1
            if i in mal_ix:
                reason, corrupt = MALFORMED[cycle % len(MALFORMED)]
                cycle += 1
                fh.write(corrupt(rec) + b"\n")
                manifest.malformed_lines.append((manifest.records - 1, reason))
                manifest.malformed += 1
                manifest.malformed_by_reason[reason] = manifest.malformed_by_reason.get(reason, 0) + 1
                continue
            manifest.valid_events += 1
            t = int(times[i])
            p = tenant_partition[int(tenant_ix[i])]
            watermark = watermarks[p]
            if watermark - cfg.lateness_ms >= t - t % cfg.window_ms + cfg.window_ms:
                manifest.late += 1
                manifest.late_event_ids.append(rec["event_id"])
            elif first_copy and t < watermark:
                manifest.out_of_order += 1
            watermarks[p] = max(watermark, t)
            if first_copy:
                manifest.distinct_events += 1
            else:
                manifest.duplicate_event_ids.append(rec["event_id"])
            fh.write(orjson.dumps(rec) + b"\n")
    if archive is not None:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with open(archive, "wb") as fh:
            for i in range(n):
                if i not in mal_ix:
                    fh.write(orjson.dumps(events[i]) + b"\n")
        manifest.archive = str(archive)
    manifest_path(out).write_text(json.dumps(asdict(manifest), indent=1))
    return manifest


def manifest_path(data_file: Path) -> Path:
    return data_file.with_name(data_file.name + ".manifest.json")


def write_lake_day(
    cfg: GeneratorConfig, lake: Path, archive: Path | None = None, chunk_events: int = 1_000_000
) -> dict[str, int]:
    """Land a generated day straight in the lake, as the stream would have, without a broker or a worker.

    For the batch side at volumes a stream run would take long to produce (bench/batch, tests of the
    recompute): Parquet files per partition in arrival order with offsets, the watermark each record met,
    second copies of duplicated events and late records where they arrive. Lost events are left out of the
    lake; with `archive`, the system of record (every event once, lost ones too) is written as JSONL. Work is
    done in chunks of `chunk_events`, so memory stays bounded whatever the day's size. Returns the counts.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from aiokafka.partitioner import DefaultPartitioner

    from batchmark.definitions import load_definitions
    from batchmark.lake import arrow_schema, day_dir

    schema = arrow_schema(load_definitions(Path(__file__).with_name("metrics.toml")).dataset)
    rng = np.random.default_rng(cfg.seed)
    start, end = day_bounds_ms(cfg.day)
    parts = list(range(cfg.partitions))
    partitioner = DefaultPartitioner()
    tenant_part = np.array([partitioner(f"tenant-{t:02d}".encode(), parts, parts) for t in range(cfg.tenants)])
    tenants = np.array([f"tenant-{t:02d}" for t in range(cfg.tenants)], dtype=object)
    users = np.array(
        [f"user-{t:02d}-{u:05d}" for t in range(cfg.tenants) for u in range(cfg.users_per_tenant)], dtype=object
    )
    t_weights = _zipf_weights(cfg.tenants, cfg.skew)
    u_weights = _zipf_weights(cfg.users_per_tenant, cfg.skew)
    out_dir = day_dir(lake, cfg.day)
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = f"bench{cfg.seed:04d}"
    next_offset = dict.fromkeys(parts, 0)
    watermark = dict.fromkeys(parts, -(2**62))
    counts = {"events": 0, "lake_records": 0, "duplicates": 0, "late": 0, "lost": 0}
    late_min = cfg.window_ms + cfg.lateness_ms + 1_000
    if archive is not None:
        archive.parent.mkdir(parents=True, exist_ok=True)
    arch = open(archive, "wb") if archive is not None else None  # noqa: SIM115 (closed below)
    try:
        for lo in range(0, cfg.events, chunk_events):
            n = min(chunk_events, cfg.events - lo)
            span = (end - start) / cfg.events
            times = np.sort(rng.integers(int(start + lo * span), int(start + (lo + n) * span), size=n))
            t_ix = rng.choice(cfg.tenants, size=n, p=t_weights)
            u_ix = rng.choice(cfg.users_per_tenant, size=n, p=u_weights)
            cols = {
                "event_id": pa.array([f"{cfg.day.isoformat()}-{i:09d}" for i in range(lo, lo + n)], pa.string()),
                "event_time_ms": pa.array(times, pa.int64()),
                "tenant": pa.array(tenants[t_ix], pa.string()),
                "user": pa.array(users[t_ix * cfg.users_per_tenant + u_ix], pa.string()),
                "job_id": pa.array([f"job-{i:09d}" for i in range(lo, lo + n)], pa.string()),
                "cpu": pa.array(rng.choice(CPUS, size=n)),
                "mem_gb": pa.array(rng.choice(MEMS, size=n)),
                "duration_s": pa.array(np.round(rng.lognormal(4.0, 1.2, size=n)).clip(1, 2_592_000)),
            }
            events = pa.table(cols)
            if arch is not None:  # the system of record: ISO times with a zone, as a source would write them
                iso = np.datetime_as_string(times.astype("datetime64[ms]"), unit="ms")
                text = {k: pc.cast(v, pa.string()) for k, v in cols.items()}
                parts_ = ['{"event_id":"', text["event_id"], '","event_time":"', pa.array(iso), 'Z","tenant":"']
                parts_ += [text["tenant"], '","user":"', text["user"], '","job_id":"', text["job_id"], '","cpu":']
                parts_ += [text["cpu"], ',"mem_gb":', text["mem_gb"], ',"duration_s":', text["duration_s"], "}\n"]
                lines = pc.binary_join_element_wise(*parts_, "")
                if isinstance(lines, pa.ChunkedArray):
                    lines = lines.combine_chunks()  # one string array: its data buffer holds the lines
                offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=0)
                arch.write(memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]])
            kinds = rng.random(n)
            lost = kinds < cfg.lost
            late = (kinds >= cfg.lost) & (kinds < cfg.lost + cfg.late)
            dup = rng.random(n) < cfg.duplicates
            delay = np.zeros(n, dtype=np.int64)
            delay[late] = rng.integers(late_min, late_min + 300_000, size=int(late.sum()))
            keep = np.flatnonzero(~lost)
            copies = np.flatnonzero(dup & ~lost)
            rows = np.concatenate([keep, copies])
            arrival = np.concatenate(
                [times[keep] + delay[keep], times[copies] + rng.integers(1, max(2, cfg.lateness_ms // 2), len(copies))]
            )
            part = tenant_part[t_ix[rows]]
            counts["events"] += n
            counts["lost"] += int(lost.sum())
            counts["duplicates"] += len(copies)
            counts["lake_records"] += len(rows)
            for p in parts:
                sel = np.flatnonzero(part == p)
                sel = sel[np.argsort(arrival[sel], kind="stable")]
                ix = rows[sel]
                ts = times[ix]
                met = np.maximum.accumulate(np.concatenate([[watermark[p]], ts]))  # before each record
                counts["late"] += int((met[:-1] - cfg.lateness_ms >= ts - ts % cfg.window_ms + cfg.window_ms).sum())
                watermark[p] = int(met[-1])
                first = next_offset[p]
                next_offset[p] += len(ix)
                table = events.take(pa.array(ix)).append_column("_epoch", pa.array([epoch] * len(ix), pa.string()))
                table = table.append_column("_partition", pa.array(np.full(len(ix), p, dtype=np.int32)))
                table = table.append_column("_offset", pa.array(np.arange(first, next_offset[p], dtype=np.int64)))
                table = table.append_column("_watermark_ms", pa.array(met[:-1], pa.int64())).cast(schema)
                name = f"part-{epoch}-p{p}-{first:012d}-{next_offset[p] - 1:012d}.parquet"
                pq.write_table(table, out_dir / name, compression="snappy", use_dictionary=["_epoch", "_partition"])
    finally:
        if arch is not None:
            arch.close()
    return counts
