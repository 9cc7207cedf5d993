"""Real producers compress: batches in gzip, snappy, lz4 and zstd all reach the stream worker, none stops it.

Each codec's producer sends its own events of one day (a quarter of the tenants' jobs each); the worker must
fold every one of them: the day's `jobs` windows count all events, per codec's share of the day.
"""

from __future__ import annotations

import asyncio
import os
from datetime import date
from pathlib import Path

import orjson
import pytest

from batchmark import config, storage
from batchmark.broker import ensure_settings_topics
from batchmark.definitions import load_definitions
from batchmark.demo import wait_for_day
from batchmark.replay import watermark_record
from batchmark.windows import day_bounds_ms
from tests.integration.conftest import running_worker

DAY = date(2026, 11, 9)
CODECS = ("gzip", "snappy", "lz4", "zstd")
PER_CODEC = 400
pytestmark = pytest.mark.timeout(600)


def _event(i: int) -> bytes:
    start, _ = day_bounds_ms(DAY)
    return orjson.dumps(
        {
            "event_id": f"c-{i}",
            "event_time": start + i * 50_000,  # codec k covers the k-th part of the day, in time order
            "tenant": f"tenant-{i % 3}",
            "user": f"u{i % 11}",
            "job_id": f"j{i}",
            "cpu": 1.0,
            "mem_gb": 2.0,
            "duration_s": 10.0,
        }
    )


async def _produce(bootstrap: str, topic: str) -> None:
    from aiokafka import AIOKafkaProducer

    i = 0
    for codec in CODECS:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50)
        await producer.start()
        try:
            sent = []
            for _ in range(PER_CODEC):
                record = _event(i)
                sent.append(await producer.send(topic, record, key=orjson.loads(record)["tenant"].encode()))
                i += 1
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        _, end = day_bounds_ms(DAY)
        for p in sorted(await producer.partitions_for(topic)):
            await producer.send_and_wait(topic, watermark_record(end + 60_000), partition=p)
    finally:
        await producer.stop()


def test_compressed_batches_of_every_codec_are_processed(pg_url: str, broker, home: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BATCHMARK_EVENTS_TOPIC", "codecs")
    monkeypatch.delenv("BATCHMARK_DLQ_TOPIC", raising=False)
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    ensure_settings_topics(settings)
    with running_worker(settings, home, "codecs") as (worker, log):
        asyncio.run(_produce(settings.bootstrap_servers, settings.events_topic))
        wait_for_day(settings, DAY, max(m.allowed_lateness_ms for m in defs.metrics), worker, log, timeout_s=240)
        assert worker.poll() is None, log.read_text()[-2000:]  # it never stopped
    assert "UnsupportedCodecError" not in log.read_text()
    assert "cyclic GC: startup objects frozen" in log.read_text()  # the worker tunes its GC (streaming.worker.tune_gc)
    with storage.transaction(pg_url) as cur:
        cur.execute("SELECT sum(value) FROM stream.results WHERE day = %s AND metric = 'jobs'", (DAY,))
        assert cur.fetchone()[0] == len(CODECS) * PER_CODEC
    assert os.environ["BATCHMARK_EVENTS_TOPIC"] == "codecs"
