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
from batchmark.errors import ServiceUnavailable
from batchmark.stream_processor import Seek, StreamProcessor

log = logging.getLogger("batchmark.worker")


# -- tuning knobs (environment; the defaults are the tested settings) -------------------------------------
def _knob(name: str, default: float | None, cast: type = int) -> Any:
    raw = os.environ.get(name, "").strip()
    return cast(raw) if raw else default


TAKE_MAX = _knob("BATCHMARK_TAKE_MAX", 10_000)  # records per batch handed to the processor
TAKE_WITHIN = _knob("BATCHMARK_TAKE_WITHIN", 0.2, float)  # seconds to wait for a batch to fill
STREAM_BUFFER_MAXSIZE = _knob("BATCHMARK_STREAM_BUFFER_MAXSIZE", 20_000)
MAX_POLL_RECORDS = _knob("BATCHMARK_MAX_POLL_RECORDS", None)  # Faust default: None (no limit)
MAX_FETCH_SIZE = _knob("BATCHMARK_MAX_FETCH_SIZE", 4 * 1024 * 1024)  # per partition; Faust default 4 MiB
CHECKPOINT_INTERVAL_S = _knob("BATCHMARK_CHECKPOINT_INTERVAL_S", 1.0, float)

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
    stream_buffer_maxsize=STREAM_BUFFER_MAXSIZE,
    broker_max_poll_records=MAX_POLL_RECORDS,
    consumer_max_fetch_size=MAX_FETCH_SIZE,
)
events_topic = app.topic(settings.events_topic, partitions=settings.partitions, acks=False, internal=False)
dlq_topic = app.topic(settings.dlq_topic, partitions=1, internal=False)
processor = StreamProcessor(settings, defs, checkpoint_interval_s=CHECKPOINT_INTERVAL_S)


@app.on_partitions_revoked.connect
async def _on_revoked(sender: Any, revoked: set[TP], **_: Any) -> None:
    async with _lock:  # never in the middle of a batch: its records would continue on a dropped state
        for tp in revoked:
            if tp.topic == settings.events_topic:
                processor.revoke(tp.partition)


async def _group_offsets(partitions: list[int]) -> dict[int, int | None] | None:
    """The offsets the broker holds for this consumer group (None per partition it holds none for).

    A plain consumer of the same group that does not subscribe asks without joining the group. (The admin
    client's OffsetFetch is not decoded correctly against the embedded broker.) None when it cannot ask.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=app.conf.id,
        enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    try:
        await consumer.start()
        return {p: await consumer.committed(TopicPartition(settings.events_topic, p)) for p in partitions}
    except Exception as exc:  # noqa: BLE001 - the check is a safeguard; the worker goes on without it
        log.warning("could not read the group's committed offsets (%r): not checking for a broker reset", exc)
        return None
    finally:
        await consumer.stop()


@app.on_partitions_assigned.connect
async def _on_assigned(sender: Any, assigned: set[TP], **_: Any) -> None:
    mine = [tp for tp in assigned if tp.topic == settings.events_topic and tp.partition not in processor.partitions]
    if not mine:
        return
    committed = await _group_offsets([tp.partition for tp in mine])  # to notice a broker that lost its state
    async with _lock:
        for tp in mine:
            known = committed is not None
            processor.assign(tp.partition, committed.get(tp.partition) if known else None, check_broker=known)


_lock = asyncio.Lock()  # the agent's batches and the idle timer's checkpoints never interleave


async def _checkpoint() -> None:
    """Commit results and resume points to Postgres, then the same resume offsets to Kafka."""
    await app.producer.flush()  # dead letters are on the broker before the checkpoint says so
    ready = _bench.closing() if _bench is not None else None
    try:
        resume = processor.checkpoint()  # on the loop thread: no record is processed meanwhile
    except (psycopg2.OperationalError, psycopg2.InterfaceError, ServiceUnavailable) as exc:
        log.warning("checkpoint failed, will retry (nothing is lost; windows stay in memory): %s", exc)
        return  # anything else is not transient: it reaches the agent's handler and stops the worker
    if resume:
        offsets = {TP(settings.events_topic, p): off for p, off in resume.items()}
        if _bench is not None:
            _bench.committed(ready)
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
        async for batch in stream.take_events(TAKE_MAX, within=TAKE_WITHIN):
            async with _lock:
                if _bench is not None:
                    _bench.batch_start(len(batch))
                for event in batch:
                    msg = event.message
                    out = processor.process(msg.partition, msg.offset, msg.key, msg.value)
                    if isinstance(out, Seek):
                        log.info(
                            "partition %d: offset %d came ahead of %d; going back",
                            out.partition,
                            msg.offset,
                            out.offset,
                        )
                        await app.consumer.seek(TP(settings.events_topic, out.partition), out.offset)
                    elif out is not None:
                        await dlq_topic.send(key=out.key, value=out.value)
                if _bench is not None:
                    _bench.batch_end()
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
        try:
            async with _lock:
                await _checkpoint()
        except Exception as exc:  # noqa: BLE001
            _fatal(exc)


# -- benchmark instrumentation (only when BATCHMARK_BENCH_STATS names a file; used by bench/stream) --------
class _BenchStats:
    """Wall times for bench/stream: first/last record processed, and window-close -> visible-in-Postgres latency.

    A window closes when its partition's watermark passes its end plus the allowed lateness. The watermark only
    moves while the agent processes a batch, so the close time of a window is taken as the START of the batch
    that moved the watermark past it (an upper bound on the latency: the closing record was processed later in
    that batch). The row is visible when the checkpoint's Postgres transaction has committed.
    """

    def __init__(self, path: str) -> None:
        import time

        self.time = time.time
        self.path = path
        self.first_wall: float | None = None
        self.last_wall: float | None = None
        self.batches = 0
        self.records = 0
        self.t_batch = 0.0
        self.wm_before: dict[int, int] = {}
        self.history: dict[int, list[tuple[int, float]]] = {}  # partition -> [(watermark after, batch start)]
        self.latencies: list[float] = []
        self.seen: set[tuple[int, int, int]] = set()

    def batch_start(self, n: int) -> None:
        self.t_batch = self.time()
        if self.first_wall is None:
            self.first_wall = self.t_batch
        self.batches += 1
        self.records += n
        self.wm_before = {p: rt.state.watermark_ms for p, rt in processor.partitions.items()}

    def batch_end(self) -> None:
        self.last_wall = self.time()
        for p, rt in processor.partitions.items():
            wm = rt.state.watermark_ms
            if wm != self.wm_before.get(p):
                self.history.setdefault(p, []).append((wm, self.t_batch))

    def closing(self) -> list[tuple[tuple[int, int, int], float]]:
        """(window, close time) of the windows the coming checkpoint will write."""
        import bisect

        from batchmark.windows import is_closed

        out = []
        for p, rt in processor.partitions.items():
            hist = self.history.get(p, [])
            wm = rt.state.watermark_ms
            for i, ms in enumerate(rt.state.metrics):
                m = ms.metric
                for start in {k[0] for k in ms.windows}:
                    if (p, i, start) in self.seen or not is_closed(start, m.window_ms, m.allowed_lateness_ms, wm):
                        continue
                    j = bisect.bisect_left(hist, (start + m.window_ms + m.allowed_lateness_ms, 0.0))
                    if j < len(hist):
                        out.append(((p, i, start), hist[j][1]))
        return out

    def committed(self, closed: list[tuple[tuple[int, int, int], float]] | None) -> None:
        import json

        now = self.time()
        for key, t in closed or ():
            self.seen.add(key)
            self.latencies.append(now - t)
        stats = {
            "pid": os.getpid(),
            "first_wall": self.first_wall,
            "last_wall": self.last_wall,
            "batches": self.batches,
            "records": self.records,
            "latencies_s": self.latencies,
            "summary": processor.summary(),
            "settings": {
                "take_max": TAKE_MAX,
                "take_within": TAKE_WITHIN,
                "stream_buffer_maxsize": STREAM_BUFFER_MAXSIZE,
                "max_poll_records": MAX_POLL_RECORDS,
                "max_fetch_size": MAX_FETCH_SIZE,
                "checkpoint_interval_s": CHECKPOINT_INTERVAL_S,
            },
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(stats, fh)
        os.replace(tmp, self.path)


_bench = _BenchStats(os.environ["BATCHMARK_BENCH_STATS"]) if os.environ.get("BATCHMARK_BENCH_STATS") else None
