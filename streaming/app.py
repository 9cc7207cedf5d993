"""batchmark stream worker: events topic -> validate -> DLQ | lake + windowed metrics -> Postgres.

Run it:   faust -A streaming.app worker --without-web -l info     (or: batchmark worker)
It logs one line per checkpoint with records processed, rejected, windows written and the watermark.

All the logic lives in batchmark.stream_processor; this file only wires Faust to it:
- the agent consumes raw bytes in batches (``take_events``) and hands each record to the processor;
- malformed records go to the dead-letter topic with their reason; the worker keeps going;
- offsets: Faust's ack-based commits are off for the events topic (``acks=False``). The processor commits
  results and resume points to Postgres first; only then is the same resume offset committed to Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import faust
import psycopg2
from faust.types import TP

from batchmark import config, storage
from batchmark.definitions import load_definitions
from batchmark.errors import BatchmarkError
from batchmark.stream_processor import StreamProcessor

log = logging.getLogger("batchmark.worker")

settings = config.load()
defs = load_definitions(settings.definitions_path)
storage.init_schema(settings.database_url)

app = faust.App(
    "batchmark-stream",
    broker=f"kafka://{settings.bootstrap_servers}",
    store="memory://",
    value_serializer="raw",
    key_serializer="raw",
    topic_partitions=settings.partitions,
    consumer_auto_offset_reset="earliest",
    broker_rebalance_timeout=10,  # joins take half the rebalance timeout on the embedded broker
    broker_session_timeout=10,
    broker_heartbeat_interval=1,
    web_enabled=False,
    web_host="127.0.0.1",
    producer_linger_ms=5,
    stream_buffer_maxsize=20_000,
)
events_topic = app.topic(settings.events_topic, partitions=settings.partitions, acks=False, internal=False)
dlq_topic = app.topic(settings.dlq_topic, partitions=1, internal=False)
processor = StreamProcessor(settings, defs)


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, revoked: set[TP], **_: Any) -> None:
    for tp in revoked:
        if tp.topic == settings.events_topic:
            processor.revoke(tp.partition)


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: set[TP], **_: Any) -> None:
    for tp in assigned:
        if tp.topic == settings.events_topic and tp.partition not in processor.partitions:
            async with _lock:
                processor.assign(tp.partition)


_lock = asyncio.Lock()  # the agent's batches and the idle timer's checkpoints never interleave


async def _checkpoint() -> None:
    """Commit results and resume points to Postgres, then the same resume offsets to Kafka."""
    await app.producer.flush()  # dead letters are on the broker before the checkpoint says so
    try:
        resume = processor.checkpoint()  # on the loop thread: no record is processed meanwhile
    except (psycopg2.Error, BatchmarkError) as exc:
        log.warning("checkpoint failed, will retry (nothing is lost; windows stay in memory): %s", exc)
        return
    if resume:
        offsets = {TP(settings.events_topic, p): off for p, off in resume.items()}
        await app.consumer._commit_offsets(offsets)  # Faust's acks are off for this topic: we commit
        s = processor.summary()
        log.info(
            "checkpoint: processed=%d rejected=%d windows_written=%d open=%d watermarks=%s",
            s["processed"],
            s["rejected"],
            s["windows_written"],
            s["open_windows"],
            s["watermarks"],
        )


def _fatal(exc: BaseException) -> None:
    """An unexpected error: stop the worker. A restart re-reads from the checkpoint; skipping would lose data."""
    log.critical(
        "stream worker stopping on an unexpected error; restart it to resume from the last checkpoint: %r",
        exc,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(70)


@app.agent(events_topic)
async def process_events(stream: faust.StreamT) -> None:
    """Validate, land and aggregate every record; checkpoint about once a second."""
    try:
        async for batch in stream.take_events(10_000, within=0.2):
            async with _lock:
                for event in batch:
                    msg = event.message
                    dead = processor.process(msg.partition, msg.offset, msg.key, msg.value)
                    if dead is not None:
                        await dlq_topic.send(key=dead.key, value=dead.value)
                if processor.checkpoint_due():
                    await _checkpoint()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        _fatal(exc)


@app.timer(interval=1.0)
async def _idle_checkpoint() -> None:
    """Close windows on time even when no new batch arrives (e.g. right after a watermark punctuation)."""
    if processor.checkpoint_due() and any(rt.dirty for rt in processor.partitions.values()):
        async with _lock:
            await _checkpoint()
