"""batchmark stream worker: events topic -> validate -> DLQ | lake + windowed metrics -> Postgres.

Run it:   faust -A streaming.app worker --without-web -l info     (or: batchmark worker)
It logs one line per checkpoint with records processed, rejected, windows written and the watermark.

All the logic lives in batchmark.stream_processor; this file only wires Faust to it:
- the events topic is fetched in batches by an aiokafka consumer inside the worker (``_fetch_events``), in its
  own consumer group ``<app id>-events``; each fetched batch is handed to the Faust agent ``process_events``
  over an in-memory channel, one channel item per batch. Faust's own per-message consumer path is bypassed for
  this topic: it costs more than all of the product's per-record work (docs/architecture.md, bench/stream);
- malformed records go to the dead-letter topic (Faust's producer) with their reason; the worker keeps going;
- offsets: auto-commit is off. The processor commits results and resume points to Postgres first; only then is
  the same resume offset committed to Kafka. On assignment the consumer seeks to the Postgres resume point.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import faust
import psycopg2
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from batchmark import config, storage
from batchmark.broker import create_topics_async, settings_topics
from batchmark.definitions import load_definitions
from batchmark.errors import ConfigError, ServiceUnavailable
from batchmark.kafka import client_kwargs, log_holds, security_from_env
from batchmark.stream_processor import READY_LINE, Seek, StreamProcessor

log = logging.getLogger("batchmark.worker")


# -- tuning knobs (environment; the defaults are the tested settings) -------------------------------------
def _knob(name: str, default: float | None, cast: type = int) -> Any:
    raw = os.environ.get(name, "").strip()
    return cast(raw) if raw else default


TAKE_MAX = _knob("BATCHMARK_TAKE_MAX", 10_000)  # most records per fetched batch handed to the agent
TAKE_WITHIN = _knob("BATCHMARK_TAKE_WITHIN", 0.2, float)  # seconds a fetch waits when nothing is buffered
MAX_FETCH_SIZE = _knob("BATCHMARK_MAX_FETCH_SIZE", 4 * 1024 * 1024)  # bytes per partition per fetch
CHECKPOINT_INTERVAL_S = _knob("BATCHMARK_CHECKPOINT_INTERVAL_S", 1.0, float)

settings = config.load()
defs = load_definitions(settings.definitions_path)

app = faust.App(
    "batchmark-stream",
    broker=f"kafka://{settings.bootstrap_servers}",
    broker_credentials=security_from_env().faust_credentials(),  # TLS / SASL from KAFKA_* (batchmark.kafka)
    store="memory://",
    value_serializer="raw",
    key_serializer="raw",
    topic_partitions=settings.partitions,
    broker_rebalance_timeout=10,  # joins take half the rebalance timeout on the embedded broker
    broker_session_timeout=10,
    broker_heartbeat_interval=1,
    web_enabled=False,
    web_host="127.0.0.1",
    producer_linger_ms=5,
)
# The fetcher's consumer group (Faust's own consumer holds the app id, with its own assignor). Renaming it loses
# nothing: offsets are resumed from the Postgres checkpoint, the group's committed offsets are not consulted.
EVENTS_GROUP = os.environ.get("BATCHMARK_CONSUMER_GROUP", "").strip() or f"{app.conf.id}-events"
dlq_topic = app.topic(settings.dlq_topic, partitions=1, internal=False)
fetched_batches = app.channel()  # in-memory: one item = one fetched batch of event records
processor = StreamProcessor(settings, defs, checkpoint_interval_s=CHECKPOINT_INTERVAL_S)
_lock = asyncio.Lock()  # batches, checkpoints and partition hand-overs never interleave
_consumer: AIOKafkaConsumer | None = None


@dataclass
class FetchedBatch:
    """What one getmany() returned, and a future the agent resolves when it has processed all of it."""

    records: dict[TopicPartition, list[Any]]
    done: asyncio.Future

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.records.values())


class _Rebalance(ConsumerRebalanceListener):
    """Partition ownership: revoked partitions drop unsaved state; assigned ones resume from Postgres."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with _lock:  # never in the middle of a batch: its records would continue on a dropped state
            for tp in revoked:
                processor.revoke(tp.partition)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        mine = [tp for tp in assigned if tp.partition not in processor.partitions]
        lost = {tp: await self._log_lost(tp) for tp in mine}  # the broker's evidence of a reset, per partition
        async with _lock:
            for tp in mine:
                resume = processor.assign(tp.partition, log_lost=lost[tp])
                # the Postgres checkpoint, not the broker's word; with none, from the start (offset 0, or the
                # earliest one kept: an offset out of range resets to the earliest)
                self.consumer.seek(tp, 0 if resume is None else resume)
        log.info("%s %s", READY_LINE, sorted(tp.partition for tp in assigned))  # demo.wait_until_ready waits for it

    async def _log_lost(self, tp: TopicPartition) -> bool:
        """Whether the broker's log no longer holds the last record the checkpoint processed: fetched, not asked
        with ListOffsets (the embedded broker under-reports the end of a multi-record batch). A log that still
        holds it is the same log (offsets expired, a renamed group): resume from the checkpoint."""
        ckpt = await asyncio.to_thread(processor.checkpoint_of, tp.partition)
        if not ckpt or ckpt[1] <= 0:
            return False
        holds = await log_holds(settings.bootstrap_servers, tp, ckpt[1] - 1)
        if holds is None:  # the check is a safeguard; the worker goes on without it
            log.warning(
                "%s[%d]: could not read the broker's log: not checking for a broker reset", tp.topic, tp.partition
            )
            return False
        if holds:
            log.info(
                "%s[%d]: the broker holds offset %d: resuming from the checkpoint", tp.topic, tp.partition, ckpt[1] - 1
            )
        return not holds


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
        if _bench is not None:
            _bench.committed(ready)
        try:  # Kafka's copy only serves the broker-reset check: Postgres is where a partition resumes from
            await _consumer.commit({TopicPartition(settings.events_topic, p): off for p, off in resume.items()})
        except (KafkaError, IllegalStateError) as exc:
            log.info("Kafka offset commit skipped (%r); Postgres holds the resume points", exc)
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


@app.task
async def _fetch_events() -> None:
    """Fetch the events topic in batches and hand each batch to the agent; wait until it is processed.

    One batch is in flight at a time, so a rebalance (which takes the lock) never finds a half-done batch,
    and a batch fetched before a rebalance is filtered by the processor's ownership and offset checks.
    """
    global _consumer
    try:  # the schema, checked at start-up (importing this module touches no service)
        await asyncio.to_thread(storage.init_schema, settings.database_url)
    except Exception as exc:  # noqa: BLE001
        _fatal(exc)
        return
    try:  # the topics with their configured partitions, before subscribing (never the broker's auto-created 1)
        await create_topics_async(settings.bootstrap_servers, settings_topics(settings), keyed=(settings.events_topic,))
    except ConfigError as exc:  # a topic with another partition count: say what to change, and stop
        log.critical("stream worker cannot start: %s", exc)
        logging.shutdown()
        os._exit(2)
    except Exception as exc:  # noqa: BLE001
        _fatal(exc)
        return
    consumer = _consumer = AIOKafkaConsumer(
        **client_kwargs(
            settings.bootstrap_servers,
            group_id=EVENTS_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=10_000,
            max_poll_interval_ms=300_000,
            max_partition_fetch_bytes=MAX_FETCH_SIZE,
            fetch_max_bytes=max(MAX_FETCH_SIZE * settings.partitions, 52_428_800),
        )
    )
    consumer.subscribe([settings.events_topic], listener=_Rebalance(consumer))
    loop = asyncio.get_running_loop()
    try:
        while not fetched_batches.subscriber_count:  # a batch sent before the agent listens would reach no one
            await asyncio.sleep(0.05)
        await consumer.start()
        while True:
            records = await consumer.getmany(timeout_ms=int(TAKE_WITHIN * 1000), max_records=TAKE_MAX)
            if records:
                batch = FetchedBatch(records, loop.create_future())
                await fetched_batches.send(value=batch)
                await batch.done
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        _fatal(exc)
    finally:
        await consumer.stop()


@app.agent(fetched_batches)
async def process_events(stream: faust.StreamT) -> None:
    """Validate, land and aggregate every record of each fetched batch; checkpoint about once a second."""
    async for batch in stream:
        try:
            async with _lock:
                if _bench is not None:
                    _bench.batch_start(len(batch))
                for tp, records in batch.records.items():
                    p = tp.partition
                    for r in records:
                        out = processor.process(p, r.offset, r.key, r.value, r.timestamp)
                        if isinstance(out, Seek):
                            log.info("partition %d: offset %d came ahead of %d; going back", p, r.offset, out.offset)
                            _consumer.seek(tp, out.offset)
                        elif out is not None:
                            await dlq_topic.send(key=out.key, value=out.value)
                if _bench is not None:
                    _bench.batch_end()
                if processor.checkpoint_due():
                    await _checkpoint()
            batch.done.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            _fatal(exc)


@app.timer(interval=1.0)
async def _idle_checkpoint() -> None:
    """Close windows on time even when no new batch arrives (e.g. right after a watermark punctuation)."""
    if _consumer is not None and processor.checkpoint_due() and any(rt.dirty for rt in processor.partitions.values()):
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

        out = []
        for p, rt in processor.partitions.items():
            hist = self.history.get(p, [])
            wm = rt.state.watermark_ms
            for i, ms in enumerate(rt.state.metrics):
                m = ms.metric
                for start in {k[0] for k in ms.windows}:
                    closes_at = rt.state.window_end(start, m.window_ms) + m.allowed_lateness_ms
                    if (p, i, start) in self.seen or wm < closes_at:
                        continue
                    j = bisect.bisect_left(hist, (closes_at, 0.0))
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
                "max_fetch_size": MAX_FETCH_SIZE,
                "checkpoint_interval_s": CHECKPOINT_INTERVAL_S,
            },
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(stats, fh)
        os.replace(tmp, self.path)


_bench = _BenchStats(os.environ["BATCHMARK_BENCH_STATS"]) if os.environ.get("BATCHMARK_BENCH_STATS") else None
