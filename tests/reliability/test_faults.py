"""Faults: a worker killed with SIGKILL at random points loses nothing and double-counts nothing.

One generated day (out-of-order, late, duplicated and malformed records included) is streamed twice on
fresh topics: once without faults (the reference), once with three SIGKILLs of the worker at random moments
of its processing, each followed by a restart. The final stream results, late counts, dead letters and lake
contents of the two runs must be the same.
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
from batchmark.broker import create_topics
from batchmark.definitions import load_definitions
from batchmark.demo import start_worker, stop, stream_day, wait_for_day, wait_until_ready
from batchmark.generator import GeneratorConfig, generate
from batchmark.lake import day_dir
from batchmark.replay import replay
from tests.integration.test_pipeline import _read_topic

DAY = date(2026, 11, 18)
pytestmark = pytest.mark.timeout(900)


def _use_topic(topic: str) -> config.Settings:
    os.environ["BATCHMARK_EVENTS_TOPIC"], os.environ["BATCHMARK_DLQ_TOPIC"] = topic, f"{topic}.dlq"
    settings = config.load()
    create_topics(settings.bootstrap_servers, {settings.events_topic: settings.partitions, settings.dlq_topic: 1})
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


def test_three_sigkills_change_nothing(pg_url: str, broker, home: Path) -> None:  # noqa: ANN001
    defs = load_definitions(config.load().definitions_path)
    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    data = home / "faults.jsonl"
    manifest = generate(
        GeneratorConfig(
            day=DAY, events=60_000, tenants=6, out_of_order=0.05, late=0.005, duplicates=0.005, malformed=0.002, seed=31
        ),
        data,
    )

    # the reference: no faults
    ref = _use_topic("faults-reference")
    stream_day(ref, defs, data, DAY, home / "worker-faults-reference.log", timeout_s=300)
    ref_results, ref_late = _snapshot(pg_url, DAY)

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
    only_ref = sorted(ref_results.keys() - results.keys())[:5]
    only_faulty = sorted(results.keys() - ref_results.keys())[:5]
    assert not only_ref and not only_faulty, (only_ref, only_faulty, kills)
    assert {k: v[1] for k, v in results.items()} == {k: v[1] for k, v in ref_results.items()}  # events per window
    kinds = {m.name: m.kind for m in defs.metrics}
    deterministic = {k: v for k, v in results.items() if kinds[k[0]] != "quantile"}
    assert deterministic == {k: v for k, v in ref_results.items() if kinds[k[0]] != "quantile"}
    assert late == ref_late and sum(late.values()) > 0
    # dead letters are at-least-once: a kill between sending and the checkpoint can repeat one, never lose one
    assert len({(d["partition"], d["offset"]) for d in dead}) == manifest.malformed <= len(dead)
    # the lake: one epoch per partition, every valid record landed, re-landings only of the same records
    epochs = _epochs(pg_url, faulty.events_topic)
    assert len(epochs) == faulty.partitions
    landed, distinct = _lake_records(faulty, epochs)
    assert distinct == manifest.valid_events <= landed
    print(
        f"\nfaults: 3 SIGKILLs at checkpointed offsets {kills}; {manifest.records} records replayed; "
        f"{len(results)} windows compared; differences: 0; dead letters {len(dead)} for "
        f"{manifest.malformed} malformed; lake re-landings {landed - distinct}"
    )
