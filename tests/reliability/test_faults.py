"""Faults: a worker killed with SIGKILL at random points, or partitions moving between workers, loses nothing
and double-counts nothing.

One generated day (out-of-order, late, duplicated and malformed records included) is streamed on fresh topics:
once without faults (the reference), once with three SIGKILLs of the worker at random moments of its
processing, each followed by a restart, and once with a second worker joining mid-stream and the first one
leaving before the end (two rebalances). The final stream results, late counts, dead letters and lake contents
must be the same as the reference's.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchmark import config, storage
from batchmark.broker import ensure_settings_topics
from batchmark.definitions import load_definitions
from batchmark.demo import start_worker, stop, stream_day, wait_for_day, wait_until_ready
from batchmark.generator import GeneratorConfig, generate
from batchmark.lake import day_dir
from batchmark.replay import replay
from batchmark.stream_processor import READY_LINE
from tests.integration.test_pipeline import _read_topic

DAY = date(2026, 11, 18)
pytestmark = pytest.mark.timeout(900)


def _use_topic(topic: str) -> config.Settings:
    os.environ["BATCHMARK_EVENTS_TOPIC"], os.environ["BATCHMARK_DLQ_TOPIC"] = topic, f"{topic}.dlq"
    settings = config.load()
    ensure_settings_topics(settings)
    return settings


def _snapshot(url: str, day: date) -> tuple[dict, dict]:
    """The day's stream results and late counts, then removed (the next run writes the same windows)."""
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, window_start, value, n_events, detail FROM stream.results WHERE day = %s", (day,)
        )
        results = {(m, g, w): (v, n, d) for m, g, w, v, n, d in cur.fetchall()}
        cur.execute("SELECT metric, window_start, partition, n_late FROM stream.late_events WHERE day = %s", (day,))
        late = {(m, w, p): n for m, w, p, n in cur.fetchall()}
        cur.execute("DELETE FROM stream.results WHERE day = %s", (day,))
        cur.execute("DELETE FROM stream.late_events WHERE day = %s", (day,))
    return results, late


def _epochs(url: str, topic: str) -> set[str]:
    with storage.transaction(url) as cur:
        cur.execute("SELECT epoch FROM stream.checkpoints WHERE topic = %s", (topic,))
        return {e for (e,) in cur.fetchall()}


def _lake_records(settings: config.Settings, epochs: set[str]) -> tuple[int, int]:
    """(records in the lake files of these epochs, distinct (epoch, partition, offset) among them)."""
    total, keys = 0, set()
    for path in day_dir(settings.events_lake, DAY).glob("part-*.parquet"):
        if path.name.split("-")[1] in epochs:
            t = pq.read_table(path, columns=["_epoch", "_partition", "_offset"]).to_pylist()
            total += len(t)
            keys.update((r["_epoch"], r["_partition"], r["_offset"]) for r in t)
    return total, len(keys)


@pytest.fixture(scope="module")
def reference(pg_url: str, broker, home: Path):  # noqa: ANN001, ANN201
    """The day, its manifest, and its results and late counts streamed without faults."""
    defs = load_definitions(config.load().definitions_path)
    data = home / "faults.jsonl"
    manifest = generate(
        GeneratorConfig(
            day=DAY, events=60_000, tenants=6, out_of_order=0.05, late=0.005, duplicates=0.005, malformed=0.002, seed=31
        ),
        data,
    )
    ref = _use_topic("faults-reference")
    stream_day(ref, defs, data, DAY, home / "worker-faults-reference.log", timeout_s=300)
    ref_results, ref_late = _snapshot(pg_url, DAY)
    return defs, data, manifest, ref_results, ref_late


def _window_values(data: Path, manifest, metric) -> dict[tuple[str, int], list[float]]:  # noqa: ANN001
    """A metric's values per (group key, window start ms): every valid line of the file (duplicate copies and
    late records included: a superset of what the stream folded, by a few records)."""
    from batchmark.engine import group_key
    from batchmark.events import Rejection, validate

    dataset = load_definitions(config.load().definitions_path).dataset
    bad = {i for i, _ in manifest.malformed_lines}
    out: dict[tuple[str, int], list[float]] = {}
    for i, line in enumerate(data.read_bytes().splitlines()):
        if i in bad:
            continue
        ev = validate(line, dataset)
        assert not isinstance(ev, Rejection), line
        t = ev["event_time_ms"]
        out.setdefault((group_key(ev, metric.group_by), t - t % metric.window_ms), []).append(
            float(metric.value_fn(ev))
        )
    return out


def _same_as_reference(results: dict, late: dict, reference: tuple, note: object) -> str:
    """Assert the run equals the reference: every window, its events, every value of the deterministic kinds
    exactly, and quantile values within their bound (KLL is randomized: a restarted sketch may pick another
    value, but both must be within twice the normalized rank error of each other). Returns what was compared."""
    import bisect

    defs, data, manifest, ref_results, ref_late = reference
    only_ref = sorted(ref_results.keys() - results.keys())[:5]
    only_here = sorted(results.keys() - ref_results.keys())[:5]
    assert not only_ref and not only_here, (only_ref, only_here, note)
    assert {k: v[1] for k, v in results.items()} == {k: v[1] for k, v in ref_results.items()}  # events per window
    kinds = {m.name: m.kind for m in defs.metrics}
    deterministic = {k: v for k, v in results.items() if kinds[k[0]] != "quantile"}
    assert deterministic == {k: v for k, v in ref_results.items() if kinds[k[0]] != "quantile"}
    assert late == ref_late and sum(late.values()) > 0
    compared, worst, same = 0, 0.0, 0
    for m in (m for m in defs.metrics if m.kind == "quantile"):
        values = {k: sorted(v) for k, v in _window_values(data, manifest, m).items()}
        for (name, key, start), (value, _, _) in results.items():
            if name != m.name:
                continue
            ref_value = ref_results[(name, key, start)][0]
            window = values[(key, int(start.timestamp() * 1000))]
            rank = bisect.bisect_right(window, value) / len(window)
            ref_rank = bisect.bisect_right(window, ref_value) / len(window)
            assert abs(rank - ref_rank) <= 2 * m.tolerance, (name, key, start, value, ref_value, note)
            worst, compared, same = max(worst, abs(rank - ref_rank)), compared + 1, same + (value == ref_value)
    assert compared > 0
    return (
        f"{len(deterministic)} windows of deterministic kinds equal exactly; {compared} quantile windows within "
        f"twice the KLL rank error of the reference ({same} equal, largest rank difference {worst:.3g})"
    )


def test_three_sigkills_change_nothing(pg_url: str, home: Path, reference) -> None:  # noqa: ANN001
    defs, data, manifest, _, _ = reference
    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    # the same day with three SIGKILLs at random moments of the processing
    faulty = _use_topic("faults-killed")
    replay(data, faulty.bootstrap_servers, faulty.events_topic, defs, progress=False)
    rng = random.Random(int(os.environ.get("BATCHMARK_FAULT_SEED", "5")))
    log = home / "worker-faults-killed.log"
    kills = []
    for _ in range(3):
        worker = start_worker(faulty, log)
        wait_until_ready(worker, log)
        time.sleep(rng.uniform(0.5, 3.0))  # a random point of the catch-up (checkpoints run about once a second)
        with storage.transaction(pg_url) as cur:
            cur.execute(
                "SELECT coalesce(sum(next_offset), 0) FROM stream.checkpoints WHERE topic = %s", (faulty.events_topic,)
            )
            kills.append(int(cur.fetchone()[0]))
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    worker = start_worker(faulty, log)
    try:
        wait_until_ready(worker, log)
        wait_for_day(faulty, DAY, lateness, worker, log, timeout_s=300)
        dead = asyncio.run(_read_topic(faulty.bootstrap_servers, faulty.dlq_topic, manifest.malformed))
    finally:
        stop(worker)
    results, late = _snapshot(pg_url, DAY)

    assert any(0 < k < manifest.records for k in kills), f"no kill landed mid-stream: {kills}"
    assert log.read_text().count("resuming at offset") >= 3  # each restart resumed from a checkpoint
    compared = _same_as_reference(results, late, reference, kills)
    # dead letters are at-least-once: a kill between sending and the checkpoint can repeat one, never lose one
    assert len({(d["partition"], d["offset"]) for d in dead}) == manifest.malformed <= len(dead)
    # the lake: one epoch per partition, every valid record landed, re-landings only of the same records
    epochs = _epochs(pg_url, faulty.events_topic)
    assert len(epochs) == faulty.partitions
    landed, distinct = _lake_records(faulty, epochs)
    assert distinct == manifest.valid_events <= landed
    print(
        f"\nfaults: 3 SIGKILLs at checkpointed offsets {kills}; {manifest.records} records replayed; "
        f"{compared}; dead letters {len(dead)} for "
        f"{manifest.malformed} malformed; lake re-landings {landed - distinct}"
    )


def _processed(url: str, topic: str) -> int:
    with storage.transaction(url) as cur:
        cur.execute("SELECT coalesce(sum(next_offset), 0) FROM stream.checkpoints WHERE topic = %s", (topic,))
        return int(cur.fetchone()[0])


def test_partitions_moving_between_two_workers_change_nothing(pg_url: str, home: Path, reference) -> None:  # noqa: ANN001
    """Worker A reads a third of the day alone; B joins (A gives up a partition); A leaves (B takes it over)."""
    defs, data, manifest, _, _ = reference
    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    moved = _use_topic("faults-rebalanced")
    lines = data.read_bytes().splitlines(keepends=True)
    cuts = [0, len(lines) // 3, 2 * len(lines) // 3, len(lines) - 500, len(lines)]
    parts = [home / f"rebalance-{i}.jsonl" for i in range(4)]
    for i, part in enumerate(parts):
        part.write_bytes(b"".join(lines[cuts[i] : cuts[i + 1]]))

    def send(part: Path, end_watermark: bool = False) -> None:  # the last part carries the day's end punctuation
        replay(part, moved.bootstrap_servers, moved.events_topic, defs, progress=False, end_watermark=end_watermark)

    log_a, log_b = home / "worker-rebalance-a.log", home / "worker-rebalance-b.log"
    a = start_worker(moved, log_a)
    b = None
    try:
        wait_until_ready(a, log_a)
        send(parts[0])
        deadline = time.monotonic() + 60
        while _processed(pg_url, moved.events_topic) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        send(parts[1])
        b = start_worker(moved, log_b)  # joins while A works through the second third
        wait_until_ready(b, log_b)
        send(parts[2])
        before_a_left = _processed(pg_url, moved.events_topic)
        stop(a)  # a graceful leave: B is assigned A's partition and resumes it from A's last checkpoint
        send(parts[3], end_watermark=True)
        wait_for_day(moved, DAY, lateness, b, log_b, timeout_s=300)
        dead = asyncio.run(_read_topic(moved.bootstrap_servers, moved.dlq_topic, manifest.malformed))
    finally:
        stop(a)
        stop(b)
    results, late = _snapshot(pg_url, DAY)

    text_a, text_b = log_a.read_text(), log_b.read_text()
    assert f"{READY_LINE} [0, 1]" in text_a  # A had both partitions at first
    assignments_b = [ln.rsplit(READY_LINE, 1)[1].strip() for ln in text_b.splitlines() if READY_LINE in ln]
    assert assignments_b[0] in ("[0]", "[1]") and assignments_b[-1] == "[0, 1]", assignments_b  # one, then both
    assert 0 < before_a_left < manifest.records, before_a_left  # the hand-over happened mid-stream
    compared = _same_as_reference(results, late, reference, (assignments_b, before_a_left))
    assert len({(d["partition"], d["offset"]) for d in dead}) == manifest.malformed <= len(dead)
    epochs = _epochs(pg_url, moved.events_topic)
    landed, distinct = _lake_records(moved, epochs)
    assert distinct == manifest.valid_events <= landed
    print(
        f"\nrebalance: B's assignments {assignments_b}; {before_a_left} records checkpointed when A left; "
        f"{compared}; lake re-landings {landed - distinct}"
    )
