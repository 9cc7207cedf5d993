"""The broker restarted (the embedded one forgets its topics and offsets): say so, damage nothing, replay restores.

A day is streamed, then the broker is replaced by an empty one on the same port and the worker restarted. The
worker must say what happened and what to replay; the results in Postgres and the files in the lake must be
untouched; replaying the day must give the same results again, with late counts replaced, not added.
"""

from __future__ import annotations

import os
import time
from datetime import date
from pathlib import Path

import pytest

from batchmark import config, storage
from batchmark.broker import EmbeddedBroker, create_topics
from batchmark.definitions import load_definitions
from batchmark.demo import start_worker, stop, stream_day, wait_for_day, wait_until_ready
from batchmark.generator import GeneratorConfig, generate
from batchmark.lake import day_dir
from batchmark.replay import replay

DAY = date(2026, 11, 12)
pytestmark = pytest.mark.timeout(600)


def _results(url: str) -> tuple[dict, int]:
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, window_start, value, n_events FROM stream.results WHERE day = %s "
            "AND metric <> 'duration_p50' AND metric <> 'duration_p95' AND metric <> 'duration_p99'",
            (DAY,),
        )
        rows = {(m, g, w): (v, n) for m, g, w, v, n in cur.fetchall()}
        cur.execute("SELECT coalesce(sum(n_late), 0) FROM stream.late_events WHERE day = %s", (DAY,))
        return rows, int(cur.fetchone()[0])


def test_broker_restart_is_reported_and_a_replay_restores_the_results(pg_url: str, home: Path) -> None:
    own = EmbeddedBroker(log_path=home / "broker-restart.log").start()  # not the session's broker
    saved = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = own.bootstrap
    os.environ["BATCHMARK_EVENTS_TOPIC"], os.environ["BATCHMARK_DLQ_TOPIC"] = "restart", "restart.dlq"
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    lateness = max(m.allowed_lateness_ms for m in defs.metrics)
    data = home / "restart.jsonl"
    generate(GeneratorConfig(day=DAY, events=15_000, tenants=4, out_of_order=0.05, late=0.01, seed=41), data)
    log = home / "worker-restart.log"
    try:
        create_topics(own.bootstrap, {settings.events_topic: settings.partitions, settings.dlq_topic: 1})
        stream_day(settings, defs, data, DAY, log)
        before, late_before = _results(pg_url)
        files_before = {p: p.stat().st_mtime_ns for p in day_dir(settings.events_lake, DAY).glob("*.parquet")}
        assert before and late_before > 0

        own.stop()  # the broker restarts: every topic, record and committed offset is gone
        own = EmbeddedBroker(port=own.port, log_path=home / "broker-restart.log").start()
        create_topics(own.bootstrap, {settings.events_topic: settings.partitions, settings.dlq_topic: 1})
        worker = start_worker(settings, log)
        try:
            wait_until_ready(worker, log)
            text = log.read_text()
            assert text.count("the broker's log ends before offset") == settings.partitions
            assert "Replay everything after" in text and "starting a new epoch" in text.lower()
            assert _results(pg_url) == (before, late_before)  # nothing committed was damaged
            assert all(p.stat().st_mtime_ns == t for p, t in files_before.items())

            with storage.transaction(pg_url) as cur:
                cur.execute("SELECT now()")
                restarted_at = cur.fetchone()[0]
            replay(data, own.bootstrap, settings.events_topic, defs, progress=False)
            wait_for_day(settings, DAY, lateness, worker, log, timeout_s=240)
        finally:
            stop(worker)
        after, late_after = _results(pg_url)
        with storage.transaction(pg_url) as cur:
            cur.execute("SELECT count(*) FROM stream.results WHERE day = %s AND updated_at < %s", (DAY, restarted_at))
            assert cur.fetchone()[0] == 0  # every window was written again by the replay
        assert after == before  # the replay restored the same results (sketches with random state excepted)
        assert late_after == late_before  # replaced within the new epoch, not added
    finally:
        own.stop()
        if saved is not None:
            os.environ["KAFKA_BOOTSTRAP_SERVERS"] = saved


def test_a_group_without_committed_offsets_resumes_from_the_checkpoint_on_a_live_broker(
    pg_url: str, broker, home: Path, monkeypatch
) -> None:  # noqa: ANN001
    """Real Kafka forgets a group's offsets (offsets.retention.minutes) and a group may be renamed: the log is
    still there, so the worker resumes from its Postgres checkpoint, in the same epoch, re-reading nothing."""
    day = date(2026, 11, 13)  # its own day: stream.results is keyed by window, not by topic
    monkeypatch.setenv("BATCHMARK_EVENTS_TOPIC", "regroup")
    monkeypatch.delenv("BATCHMARK_DLQ_TOPIC", raising=False)
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    data = home / "regroup.jsonl"
    generate(GeneratorConfig(day=day, events=6_000, tenants=3, out_of_order=0.05, seed=43), data)
    log = home / "worker-regroup.log"
    create_topics(settings.bootstrap_servers, {settings.events_topic: settings.partitions, settings.dlq_topic: 1})
    stream_day(settings, defs, data, day, log)

    def state() -> tuple[list, tuple]:
        with storage.transaction(pg_url) as cur:
            cur.execute("SELECT partition, next_offset, epoch FROM stream.checkpoints WHERE topic = 'regroup'")
            checkpoints = sorted(cur.fetchall())
            cur.execute("SELECT count(*), max(updated_at) FROM stream.results WHERE day = %s", (day,))
            return checkpoints, cur.fetchone()

    before = state()
    assert len(before[0]) == settings.partitions and all(n > 0 for _, n, _ in before[0]) and before[1][0] > 0
    seen = len(log.read_text())
    monkeypatch.setenv("BATCHMARK_CONSUMER_GROUP", "batchmark-renamed")  # a group with no committed offset
    worker = start_worker(settings, log)
    try:
        wait_until_ready(worker, log)
        time.sleep(3)  # a few checkpoints' time: nothing may be read again
    finally:
        stop(worker)
    text = log.read_text()[seen:]
    assert text.count("resuming from the checkpoint") == settings.partitions, text[-3000:]
    assert "new epoch" not in text and "log ends before" not in text
    assert state() == before  # the same epoch and position, and no window written again
