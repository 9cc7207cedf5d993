"""The stream worker's wiring of Faust to batchmark.stream_processor, built per app (streaming.app.create_app).

- the events topic is fetched in batches by an aiokafka consumer inside the worker (``fetch_events``), in its own
  consumer group; each fetched batch is handed to the Faust agent ``process_events`` over an in-memory channel,
  one channel item per batch. Faust's own per-message consumer path is bypassed for this topic: it costs more than
  all of the product's per-record work (docs/architecture.md, bench/stream);
- malformed records go to the dead-letter topic (Faust's producer) with their reason; the worker keeps going;
- offsets: auto-commit is off. The processor commits results and resume points to Postgres first; only then is
  the same resume offset committed to Kafka. On assignment the consumer seeks to the Postgres resume point.
Everything a worker holds (processor, lock, consumer) belongs to its StreamWorker, so two apps with different
definitions and consumer groups can run side by side; instrumentation comes in through WorkerHooks.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import faust
import psycopg2
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from batchmark import storage
from batchmark.broker import create_topics_async, settings_topics
from batchmark.config import Settings
from batchmark.definitions import WORKER_KNOBS, Definitions
from batchmark.errors import ConfigError, ServiceUnavailable
from batchmark.kafka import client_kwargs, log_holds, raw_records_consumer
from batchmark.stream_processor import READY_LINE, Seek, StreamProcessor

log = logging.getLogger("batchmark.worker")


@dataclass(frozen=True)
class Knobs:
    """Tuning knobs (environment; the defaults are the tested settings)."""

    take_max: int = 10_000  # most records per fetched batch handed to the agent
    take_within: float = 0.2  # seconds a fetch waits when nothing is buffered
    max_fetch_size: int = 4 * 1024 * 1024  # bytes per partition per fetch
    checkpoint_interval_s: float = 1.0
    gc_young: int = 100_000  # the cyclic GC's young-generation threshold (tune_gc); 0: Python's GC as it is

    @staticmethod
    def from_env() -> Knobs:
        """The knobs from BATCHMARK_* variables; a value outside the knob's kind or range is refused."""
        d, values = Knobs(), {}
        for name, knob in WORKER_KNOBS.items():  # names, kinds and ranges: one table (batchmark.definitions)
            raw = os.environ.get(knob.env, "").strip()
            if not raw:
                continue
            try:
                value: Any = knob.kind(raw)
            except ValueError:
                value = raw
            problem = knob.check(value)
            if problem:
                raise ConfigError(f"{knob.env}={raw!r} {problem} (default {getattr(d, name)})")
            values[name] = value
        return Knobs(**values)


def tune_gc(young: int) -> bool:
    """Fewer and cheaper cyclic garbage collections for the worker's way of allocating; False if left as is.

    A fetched batch allocates tens of thousands of containers (event dicts, group-key tuples) that live until the
    batch is folded. Under Python's default threshold (700) they are traced, promoted and traced again by full
    collections that also walk every object of Faust, aiokafka and pyarrow: a fifth of the worker's CPU
    (bench/stream). So once the worker has started, what exists then is frozen (``gc.freeze``: never traced
    again; these are the modules, the app and its services, which live as long as the process) and the young
    generation is collected once `young` more containers are alive than at the last collection (what reference
    counts free does not count, so a batch's dicts never trigger one). Full collections still run (every 200
    young ones, when a quarter of the traced objects are new: Python's own rule), so cyclic garbage, which
    reference counts never free, is still collected, later.
    """
    if young <= 0:
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, 20, 10)
    return True


class WorkerHooks(Protocol):
    """Instrumentation a worker calls (bench/stream's statistics implement it); all optional to act on."""

    def batch_start(self, processor: StreamProcessor, n: int) -> None: ...
    def batch_end(self, processor: StreamProcessor) -> None: ...
    def closing(self, processor: StreamProcessor) -> Any: ...  # before a checkpoint; its result goes to committed
    def committed(self, processor: StreamProcessor, token: Any) -> None: ...


@dataclass
class FetchedBatch:
    """What one getmany() returned, and a future the agent resolves when it has processed all of it."""

    records: dict[TopicPartition, list[Any]]
    done: asyncio.Future

    def __len__(self) -> int:
        return sum(len(rs) for rs in self.records.values())


def fatal(exc: BaseException) -> None:
    """An unexpected error: stop the worker. A restart re-reads from the checkpoint; skipping would lose data."""
    log.critical(
        "stream worker stopping on an unexpected error; restart it to resume from the last checkpoint: %r",
        exc,
        exc_info=exc,
    )
    logging.shutdown()
    os._exit(70)


class StreamWorker:
    """One app's worker: the fetcher task, the agent, the idle-checkpoint timer and the state they share."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        defs: Definitions,
        knobs: Knobs | None = None,
        hooks: WorkerHooks | None = None,
        group: str | None = None,
    ) -> None:
        self.app, self.settings, self.defs = app, settings, defs
        self.knobs = knobs or Knobs()
        self.hooks = hooks
        # The fetcher's consumer group (Faust's own consumer holds the app id, with its own assignor). Renaming it
        # loses nothing: offsets are resumed from the Postgres checkpoint, the group's offsets are not consulted.
        self.group = group or f"{app.conf.id}-events"
        self.processor = StreamProcessor(settings, defs, checkpoint_interval_s=self.knobs.checkpoint_interval_s)
        self.lock = asyncio.Lock()  # batches, checkpoints and partition hand-overs never interleave
        self.consumer: AIOKafkaConsumer | None = None
        self.dlq_topic = app.topic(settings.dlq_topic, partitions=1, internal=False)
        self.batches = app.channel()  # in-memory: one item = one fetched batch of event records
        app.task(self.fetch_events)
        self.agent = app.agent(self.batches, name=f"{app.conf.id}.process_events")(self.process_events)
        app.timer(interval=1.0, name=f"{app.conf.id}.idle_checkpoint")(self.idle_checkpoint)

    async def fetch_events(self) -> None:
        """Fetch the events topic in batches and hand each batch to the agent; wait until it is processed.

        One batch is in flight at a time, so a rebalance (which takes the lock) never finds a half-done batch,
        and a batch fetched before a rebalance is filtered by the processor's ownership and offset checks.
        """
        s, k = self.settings, self.knobs
        try:  # the schema, checked at start-up (building the app touches no service)
            await asyncio.to_thread(storage.init_schema, s.database_url)
        except Exception as exc:  # noqa: BLE001
            fatal(exc)
            return
        try:  # the topics with their configured partitions, before subscribing (never the broker's auto-created 1)
            await create_topics_async(s.bootstrap_servers, settings_topics(s), keyed=(s.events_topic,))
        except ConfigError as exc:  # a topic with another partition count: say what to change, and stop
            log.critical("stream worker cannot start: %s", exc)
            logging.shutdown()
            os._exit(2)
        except Exception as exc:  # noqa: BLE001
            fatal(exc)
            return
        consumer = self.consumer = raw_records_consumer(  # aiokafka's decoded records, without a copy each
            **client_kwargs(
                s.bootstrap_servers,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=10_000,
                heartbeat_interval_ms=1_000,
                rebalance_timeout_ms=10_000,
                max_poll_interval_ms=300_000,
                max_partition_fetch_bytes=k.max_fetch_size,
                fetch_max_bytes=max(k.max_fetch_size * s.partitions, 52_428_800),
            )
        )
        consumer.subscribe([s.events_topic], listener=Rebalance(self))
        loop = asyncio.get_running_loop()
        try:
            while not self.batches.subscriber_count:  # a batch sent before the agent listens would reach no one
                await asyncio.sleep(0.05)
            await consumer.start()
            if tune_gc(k.gc_young):
                log.info("cyclic GC: startup objects frozen, young generation every %d allocations", k.gc_young)
            while True:
                records = await consumer.getmany(timeout_ms=int(k.take_within * 1000), max_records=k.take_max)
                if records:
                    batch = FetchedBatch(records, loop.create_future())
                    await self.batches.send(value=batch)
                    await batch.done
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            fatal(exc)
        finally:
            await consumer.stop()

    async def process_events(self, stream: faust.StreamT) -> None:
        """Validate, land and aggregate every record of each fetched batch; checkpoint about once a second."""
        processor, hooks = self.processor, self.hooks
        async for batch in stream:
            try:
                async with self.lock:
                    if hooks is not None:
                        hooks.batch_start(processor, len(batch))
                    for tp, records in batch.records.items():
                        for out in processor.process_batch(tp.partition, records):
                            if isinstance(out, Seek):
                                log.info(
                                    "partition %d: going back to %d (records came ahead of it)",
                                    out.partition,
                                    out.offset,
                                )
                                self.consumer.seek(tp, out.offset)
                            else:
                                await self.dlq_topic.send(key=out.key, value=out.value)
                    if hooks is not None:
                        hooks.batch_end(processor)
                    if processor.checkpoint_due():
                        await self.checkpoint()
                batch.done.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                fatal(exc)

    async def idle_checkpoint(self) -> None:
        """Close windows on time even when no new batch arrives (e.g. right after a watermark punctuation)."""
        processor = self.processor
        if (
            self.consumer is not None
            and processor.checkpoint_due()
            and any(rt.dirty for rt in processor.partitions.values())
        ):
            try:
                async with self.lock:
                    await self.checkpoint()
            except Exception as exc:  # noqa: BLE001
                fatal(exc)

    async def checkpoint(self) -> None:
        """Commit results and resume points to Postgres, then the same resume offsets to Kafka."""
        await self.app.producer.flush()  # dead letters are on the broker before the checkpoint says so
        token = self.hooks.closing(self.processor) if self.hooks is not None else None
        try:
            resume = self.processor.checkpoint()  # on the loop thread: no record is processed meanwhile
        except (psycopg2.OperationalError, psycopg2.InterfaceError, ServiceUnavailable) as exc:
            log.warning("checkpoint failed, will retry (nothing is lost; windows stay in memory): %s", exc)
            return  # anything else is not transient: it reaches the agent's handler and stops the worker
        if not resume:
            return
        if self.hooks is not None:
            self.hooks.committed(self.processor, token)
        try:  # Kafka's copy is informational: Postgres is where a partition resumes from
            topic = self.settings.events_topic
            await self.consumer.commit({TopicPartition(topic, p): off for p, off in resume.items()})
        except (KafkaError, IllegalStateError) as exc:
            log.info("Kafka offset commit skipped (%r); Postgres holds the resume points", exc)
        s = self.processor.summary()
        log.info(
            "checkpoint: processed=%d rejected=%d windows_written=%d open=%d watermarks=%s",
            s["processed"],
            s["rejected"],
            s["windows_written"],
            s["open_windows"],
            s["watermarks"],
        )


class Rebalance(ConsumerRebalanceListener):
    """Partition ownership: revoked partitions drop unsaved state; assigned ones resume from Postgres."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.worker.lock:  # never in the middle of a batch: its records would continue on a dropped state
            for tp in revoked:
                self.worker.processor.revoke(tp.partition)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        processor = self.worker.processor
        mine = [tp for tp in assigned if tp.partition not in processor.partitions]
        lost = {tp: await self._log_lost(tp) for tp in mine}  # the broker's evidence of a reset, per partition
        async with self.worker.lock:
            for tp in mine:
                resume = processor.assign(tp.partition, log_lost=lost[tp])
                # the Postgres checkpoint, not the broker's word; with none, from the start (offset 0, or the
                # earliest one kept: an offset out of range resets to the earliest)
                self.worker.consumer.seek(tp, 0 if resume is None else resume)
        log.info("%s %s", READY_LINE, sorted(tp.partition for tp in assigned))  # demo.wait_until_ready waits for it

    async def _log_lost(self, tp: TopicPartition) -> bool:
        """Whether the broker's log no longer holds the last record the checkpoint processed: fetched, not asked
        with ListOffsets (the embedded broker under-reports the end of a multi-record batch). A log that still
        holds it is the same log (offsets expired, a renamed group): resume from the checkpoint."""
        ckpt = await asyncio.to_thread(self.worker.processor.checkpoint_of, tp.partition)
        if not ckpt or ckpt[1] <= 0:
            return False
        holds = await log_holds(self.worker.settings.bootstrap_servers, tp, ckpt[1] - 1)
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
