"""What the stream worker does with each record, independent of Faust.

For every record of a topic partition: validate it (bad -> a dead-letter record with its reason), land it in
the lake, fold it into the open windows. ``checkpoint`` closes the windows the watermark has passed and commits,
in ONE Postgres transaction, their results, the late-event counts and the partition's resume point. Only then
does the worker commit that resume offset to Kafka. After a crash the worker re-reads from the resume point:
records below the checkpoint's next offset are re-folded only into windows that were still open (their results
were not written yet) and are not landed or dead-lettered again. So every window's result counts each record
once, without broker transactions and without trusting the broker's end offsets.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import psycopg2

from batchmark import storage
from batchmark.config import Settings
from batchmark.definitions import Definitions
from batchmark.engine import PartitionState, WindowResult
from batchmark.events import Rejection, validator
from batchmark.lake import LakeWriter, write_watermark
from batchmark.replay import WATERMARK_KEY
from batchmark.windows import ms_to_datetime

log = logging.getLogger("batchmark.stream")
_WATERMARK_PREFIX = b'{"' + WATERMARK_KEY.encode() + b'":'
DLQ_RAW_LIMIT = 64 * 1024
# What the worker logs once its events consumer holds its partitions (batchmark.demo.wait_until_ready waits for it).
READY_LINE = "events consumer assigned partitions"


SEEK_GRACE_S = 10.0  # after a seek, how long to wait for the expected offset before accepting a gap
CLOSE_CHECKPOINT_GAP_S = 0.2  # a window that has closed is written this soon after the previous checkpoint


@dataclass(frozen=True)
class Seek:
    """Ask the consumer to re-deliver a partition from `offset` (a record arrived ahead of its turn)."""

    partition: int
    offset: int


class Record(NamedTuple):
    """One record of the events topic: what the processor reads of an aiokafka record."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None


@dataclass
class DeadLetter:
    """A rejected record, ready for the dead-letter topic."""

    key: bytes | None
    value: bytes


@dataclass
class _Partition:
    state: PartitionState
    lake: LakeWriter
    next_offset: int = 0
    replay_until: int = 0  # records below this were handled before the last checkpoint
    position: int | None = None  # the next offset expected; None until the first record of a fresh partition
    seeking_since: float | None = None  # set while waiting for the record at `position` after a seek
    epoch: str = ""
    dirty: bool = False
    live: set[tuple[str, str, int]] = field(default_factory=set)  # (metric, group, start) in stream.open_windows
    rejected: dict[tuple[Any, str], int] = field(default_factory=dict)  # (day, reason) -> dead letters not saved yet


@dataclass
class Counters:
    processed: int = 0
    valid: int = 0
    rejected: int = 0
    replayed: int = 0
    windows_written: int = 0
    checkpoints: int = 0
    broker_resets: int = 0
    skipped: int = 0  # re-delivered, stale or not-ours records passed over
    by_reason: dict[str, int] = field(default_factory=dict)


def dead_letter(topic: str, partition: int, offset: int, key: bytes | None, raw: bytes, why: Rejection) -> DeadLetter:
    """The DLQ record: reason, detail, where it came from, and the raw bytes (base64; capped, with a hash)."""
    body = {
        "reason": why.reason,
        "detail": why.detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "raw_bytes": len(raw),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
        "raw_b64": base64.b64encode(raw[:DLQ_RAW_LIMIT]).decode(),
        "raw_truncated": len(raw) > DLQ_RAW_LIMIT,
    }
    return DeadLetter(key=key, value=orjson.dumps(body))


class StreamProcessor:
    """Per-partition window state, lake landing and checkpoints for one worker."""

    def __init__(self, settings: Settings, defs: Definitions, checkpoint_interval_s: float = 1.0) -> None:
        self.settings = settings
        self.defs = defs
        self.topic = settings.events_topic
        self.checkpoint_interval_s = checkpoint_interval_s
        self.partitions: dict[int, _Partition] = {}
        self.counters = Counters()
        self.validate = validator(defs.dataset)
        self._last_checkpoint = time.monotonic()
        self._last_live = 0.0

    # -- assignment -------------------------------------------------------------------------------------
    def checkpoint_of(self, partition: int) -> tuple[int, int, int, str] | None:
        """The partition's Postgres checkpoint: (resume offset, next offset, watermark, epoch), or None."""
        return storage.read_checkpoint(self.settings.database_url, self.topic, partition)

    def assign(self, partition: int, log_lost: bool = False) -> int | None:
        """Take over a partition from its Postgres checkpoint; returns the offset to resume from (or None).

        The checkpoint is the truth: the consumer group's committed offset is not consulted (it expires, and a
        renamed group has none). log_lost: the broker's own evidence that its log no longer holds the records
        the checkpoint says were processed (its log ends before the checkpoint's last offset: a broker that
        forgot everything, a topic recreated). Then say so and start a new epoch from the topic's beginning;
        results and lake files already written stay as they are.
        """
        url = self.settings.database_url
        ckpt = self.checkpoint_of(partition)
        if ckpt and log_lost and ckpt[1] > 0:
            resume, next_offset, watermark, old_epoch = ckpt
            log.error(
                "%s[%d]: the broker's log ends before offset %d, which Postgres records as processed "
                "(epoch %s, watermark %s). The broker was restarted or the topic recreated, so its records are "
                "gone. Starting a new epoch from the topic's beginning; stream results and lake files already "
                "written are kept. Replay everything after %s (e.g. `batchmark replay FILE`) to restore results.",
                self.topic,
                partition,
                next_offset - 1,
                old_epoch,
                ms_to_datetime(watermark).isoformat(),
                ms_to_datetime(watermark).isoformat(),
            )
            self.counters.broker_resets += 1
            ckpt = None
        epoch = ckpt[3] if ckpt and ckpt[3] else uuid.uuid4().hex[:8]
        lake = LakeWriter(self.settings.events_lake, self.defs.dataset, partition, epoch)
        rt = _Partition(PartitionState(self.defs), lake, epoch=epoch)
        if ckpt:
            resume, next_offset, watermark, _ = ckpt
            rt.state.watermark_ms = watermark
            rt.replay_until = rt.next_offset = next_offset
            rt.position = resume if next_offset > 0 else None
            log.info(
                "partition %d: resuming at offset %d (epoch %s, checkpoint next=%d, watermark=%d)",
                partition,
                resume,
                epoch,
                next_offset,
                watermark,
            )
        else:
            with storage.transaction(url) as cur:  # the epoch is kept from the start: a crash reuses it
                storage.write_checkpoint(cur, self.topic, partition, 0, 0, rt.state.watermark_ms, epoch)
            # and the lake stops claiming days a former epoch had closed: nothing of this one is landed yet
            write_watermark(self.settings.events_lake, self.topic, partition, rt.state.watermark_ms, 0)
            log.info("partition %d: no checkpoint, starting epoch %s", partition, epoch)
        self.partitions[partition] = rt
        return ckpt[0] if ckpt else None

    def revoke(self, partition: int) -> None:
        """Forget a partition's unsaved state: its next owner re-reads it from the checkpoint."""
        self.partitions.pop(partition, None)

    # -- processing -------------------------------------------------------------------------------------
    def process(
        self, partition: int, offset: int, key: bytes | None, raw: bytes | None, timestamp_ms: int | None = None
    ) -> DeadLetter | Seek | None:
        """Handle one record (``process_batch`` of one); returns its dead letter or Seek, if any."""
        out = self.process_batch(partition, [Record(offset, key, raw, timestamp_ms)])
        return out[0] if out else None

    def process_batch(self, partition: int, records: Sequence[Any]) -> list[DeadLetter | Seek]:
        """Handle a partition's fetched records in order (anything with offset, key, value and timestamp: the
        records of batchmark.kafka.raw_records_consumer); returns the dead letters for malformed ones, and Seeks.

        A dead letter is also counted per day (of the record's timestamp: the replayer stamps the event time)
        and reason; the counts are committed with the checkpoint, so each is counted once (stream.rejections).

        Records must come in offset order from the partition's resume point. One already handled (a
        re-delivery) is skipped; one ahead of its turn (records fetched before a rebalance, delivered after
        the consumer went back to the checkpoint) is not processed: the consumer is asked to go back to the
        expected offset. A record of a partition this worker does not own is skipped: its owner reads it.
        Clean events are folded in runs (``PartitionState.add_batch``); a watermark punctuation folds the run
        before it first, so every event meets the watermark it would meet one record at a time.
        """
        c = self.counters
        rt = self.partitions.get(partition)
        if rt is None:
            c.skipped += len(records)
            return []
        out: list[DeadLetter | Seek] = []
        seeks: list[tuple[int, Seek]] = []  # (records admitted before it, the seek): outputs keep record order
        first = records[0].offset if records else None
        if first is not None and rt.position == first and records[-1].offset - first == len(records) - 1:
            admitted = records  # the usual batch: the next offsets in a row (a fetch's offsets only increase)
            rt.seeking_since = None
        else:
            admitted = []
            for r in records:
                offset = r.offset
                if rt.position is not None and offset != rt.position:
                    if offset < rt.position:
                        c.skipped += 1
                        continue
                    now = time.monotonic()
                    if rt.seeking_since is None:
                        rt.seeking_since = now
                        seeks.append((len(admitted), Seek(partition, rt.position)))
                        continue
                    if now - rt.seeking_since < SEEK_GRACE_S:
                        c.skipped += 1
                        continue
                    log.warning(
                        "partition %d: offset %d never came back after a seek; continuing at %d (a gap in the log)",
                        partition,
                        rt.position,
                        offset,
                    )
                rt.position = offset + 1
                rt.seeking_since = None
                admitted.append(r)
        if not admitted:
            return [seek for _, seek in seeks]
        last = admitted[-1].offset
        rt.position = last + 1
        c.processed += len(admitted)
        if last >= rt.next_offset:
            rt.next_offset = last + 1
        rt.dirty = True
        replay_until = rt.replay_until
        raws = [r.value or b"" for r in admitted]  # a null value (a tombstone) is not an event: b"" is refused
        checked = list(map(self.validate, raws))  # a punctuation is refused too, and handled below
        offsets = [r.offset for r in admitted]
        if offsets[0] >= replay_until and Rejection not in set(map(type, checked)):
            c.valid += len(checked)  # the usual batch: clean events, none re-read
            self._fold(rt, checked, offsets, False)
            return [seek for _, seek in seeks]
        calendar = self.defs.dataset.calendar
        events: list[dict[str, Any]] = []  # the current run of clean events, and their offsets
        run: list[int] = []
        run_replaying = False
        for j, (r, raw, event, offset) in enumerate(zip(admitted, raws, checked, offsets, strict=True)):
            while seeks and seeks[0][0] <= j:
                out.append(seeks.pop(0)[1])
            replaying = offset < replay_until
            if raw.startswith(_WATERMARK_PREFIX):
                try:
                    mark = int(orjson.loads(raw)[WATERMARK_KEY])
                except (orjson.JSONDecodeError, TypeError, ValueError):
                    mark = None  # not a well-formed punctuation: validated like any record (-> DLQ)
                if mark is not None:
                    self._fold(rt, events, run, run_replaying)
                    events, run = [], []
                    rt.state.advance(mark)
                    continue
            if isinstance(event, Rejection):
                if replaying:
                    c.replayed += 1
                    continue
                c.rejected += 1
                c.by_reason[event.reason] = c.by_reason.get(event.reason, 0) + 1
                ts = r.timestamp
                ms = ts if ts and ts > 0 else int(time.time() * 1000)
                day = calendar.day_of(ms)  # the dataset's day, in its time zone
                rt.rejected[(day, event.reason)] = rt.rejected.get((day, event.reason), 0) + 1
                out.append(dead_letter(self.topic, partition, offset, r.key, raw, event))
                continue
            c.valid += 1
            if replaying:
                c.replayed += 1
            if events and replaying != run_replaying:
                self._fold(rt, events, run, run_replaying)
                events, run = [], []
            run_replaying = replaying
            events.append(event)
            run.append(offset)
        self._fold(rt, events, run, run_replaying)
        return out + [seek for _, seek in seeks]

    @staticmethod
    def _fold(rt: _Partition, events: list[dict[str, Any]], offsets: list[int], replaying: bool) -> None:
        """Fold a run of clean events into the open windows, and land them unless they were landed before the
        last checkpoint (a re-read after a restart: below replay_until, where nothing is counted late again)."""
        if not events:
            return
        marks = rt.state.add_batch(events, offsets, count_late=not replaying)
        if not replaying:
            rt.lake.add_many(events, offsets, marks)

    def checkpoint_due(self) -> bool:
        """Every checkpoint_interval_s, and sooner (CLOSE_CHECKPOINT_GAP_S) once a window has closed.

        Windows close when the watermark passes their end plus the lateness; writing them right away keeps
        close -> visible short without checkpointing more often while nothing closes.
        """
        elapsed = time.monotonic() - self._last_checkpoint
        if elapsed >= self.checkpoint_interval_s:
            return True
        return elapsed >= CLOSE_CHECKPOINT_GAP_S and any(
            rt.dirty and rt.state.has_closed_windows() for rt in self.partitions.values()
        )

    def checkpoint(self) -> dict[int, int]:
        """Close ready windows and commit results + resume points; returns {partition: resume_offset}.

        Windows and late counts leave memory only after the Postgres commit; if anything fails, the error
        propagates and nothing is lost: the next checkpoint writes the same rows again.
        """
        results: list[WindowResult] = []
        late: dict[int, list[tuple[str, int, int]]] = {}
        points: dict[int, tuple[int, int, int]] = {}
        closed: dict[int, list[tuple[int, tuple[int, str]]]] = {}
        every = self.settings.live_interval_s
        live = every > 0 and time.monotonic() - self._last_live >= every  # refresh the open windows' values too
        provisional: dict[int, list[WindowResult]] = {}
        closing: dict[int, list[WindowResult]] = {}
        provisional_new: dict[int, list[WindowResult]] = {}
        for p, rt in self.partitions.items():
            if not rt.dirty:
                continue
            rows, keys = rt.state.close_ready()
            results.extend(rows)
            closed[p] = keys
            late[p] = rt.state.late_counts()
            if live:  # every open window's value so far
                provisional[p] = rt.state.provisional(exclude=keys)
            elif every > 0:  # between refreshes: closed windows leave with their results, new ones appear
                opened = rt.state.provisional(exclude=keys, known=rt.live)
                if rows or opened:
                    closing[p] = rows
                    provisional_new[p] = opened
            rt.lake.flush()  # the lake holds everything below next_offset before the checkpoint says so
            first_open = rt.state.first_open_offset(exclude=keys)
            resume = min(first_open, rt.next_offset) if first_open is not None else rt.next_offset
            points[p] = (resume, rt.next_offset, rt.state.watermark_ms)
        if points:
            with storage.transaction(self.settings.database_url) as cur:
                storage.upsert_stream_results(cur, results, self.defs.dataset.calendar)
                for p, counts in late.items():
                    storage.add_late_events(cur, p, self.partitions[p].epoch, counts, self.defs.dataset.calendar)
                    storage.add_stream_rejections(
                        cur, self.topic, p, self.partitions[p].epoch, self.partitions[p].rejected
                    )
                for p, (resume, nxt, wm) in points.items():
                    storage.write_checkpoint(cur, self.topic, p, resume, nxt, wm, self.partitions[p].epoch)
                live_written = self._write_live(cur, provisional, closing, provisional_new, points)
            if live:
                self._last_live = time.monotonic()
            for p, (_, nxt, wm) in points.items():
                rt = self.partitions[p]
                if live_written:  # what stream.open_windows now holds for the partition
                    if p in provisional:
                        rt.live = {(r.metric, r.group_key, r.window_start_ms) for r in provisional[p]}
                    else:
                        rt.live -= {(r.metric, r.group_key, r.window_start_ms) for r in closing.get(p, [])}
                        rt.live |= {(r.metric, r.group_key, r.window_start_ms) for r in provisional_new.get(p, [])}
                rt.state.forget(closed[p])
                rt.state.clear_late()
                rt.rejected.clear()
                rt.dirty = False
                write_watermark(self.settings.events_lake, self.topic, p, wm, nxt)
            self.counters.windows_written += len(results)
            self.counters.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        return {p: v[0] for p, v in points.items()}

    def _write_live(
        self,
        cur: Any,
        provisional: dict[int, list[WindowResult]],
        closing: dict[int, list[WindowResult]],
        opened: dict[int, list[WindowResult]],
        points: dict[int, tuple[int, int, int]],
    ) -> bool:
        """The live rows (stream.open_windows), inside the checkpoint's transaction but under a savepoint: a
        display table that fails (a schema not upgraded yet, a race with a zombie owner) must never cost the
        checkpoint its results. A refresh replaces a partition's rows; between refreshes closed windows are
        deleted and newly opened ones inserted (their values refresh with the next refresh). True if written."""
        if not provisional and not closing and not opened:
            return True
        cur.execute("SAVEPOINT live_windows")
        try:
            for p, rows in provisional.items():
                storage.replace_open_windows(cur, self.topic, p, rows, points[p][2])
            for p, rows in closing.items():
                storage.drop_open_windows(cur, self.topic, p, rows)
            for p, rows in opened.items():
                storage.upsert_open_windows(cur, self.topic, p, rows, points[p][2])
            cur.execute("RELEASE SAVEPOINT live_windows")
            return True
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT live_windows")
            log.warning("live windows not updated (results and checkpoint are): %s", exc)
            return False

    def summary(self) -> dict[str, Any]:
        c = self.counters
        return {
            "processed": c.processed,
            "valid": c.valid,
            "rejected": c.rejected,
            "replayed": c.replayed,
            "windows_written": c.windows_written,
            "checkpoints": c.checkpoints,
            "open_windows": sum(rt.state.open_windows for rt in self.partitions.values()),
            "watermarks": {p: rt.state.watermark_ms for p, rt in self.partitions.items()},
        }
