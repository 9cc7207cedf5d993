"""The dead-letter topic, read and re-driven: what ``batchmark dlq`` shows and does.

Each dead letter (batchmark.stream_processor.dead_letter) holds the reason, its detail, where the record came
from (topic, partition, offset) and its raw bytes. ``read`` lists them (filtered); ``preview`` shows raw bytes
safely (control characters and invalid UTF-8 escaped, cut to a length); ``redrive`` sends chosen ones back to
the topic they came from once the definitions accept them. A re-driven record is sent byte for byte, so it keeps its
event id: the batch de-duplicates on it, and since the stream never counted the rejected copy, nothing is
counted twice. Each record is re-driven at most once (stream.redriven, keyed by its source position), back
to the topic it came from.
"""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass
from typing import Any

import orjson

from batchmark import storage
from batchmark.definitions import Definitions
from batchmark.events import Rejection, decode, parse_event_time, validate_record
from batchmark.kafka import client_kwargs

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, decoded."""

    dlq_partition: int
    dlq_offset: int
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    raw: bytes
    raw_bytes: int
    truncated: bool
    timestamp_ms: int

    @property
    def position(self) -> str:
        """Where it sits in the dead-letter topic: 'partition:offset', what --show and --redrive take."""
        return f"{self.dlq_partition}:{self.dlq_offset}"

    @property
    def source(self) -> tuple[str, int, int]:
        """The record's own position (topic, partition, offset): one record, however often it was dead-lettered
        (a worker that stops before its checkpoint dead-letters the same record again after the restart)."""
        return (self.topic, self.partition, self.offset)


def preview(raw: bytes, limit: int = 120) -> str:
    """Raw bytes as one safe line: invalid UTF-8 as \\xNN, control and bidi characters as \\uNNNN, at most
    `limit` characters (with '…' when cut)."""
    text = raw.decode("utf-8", errors="backslashreplace")
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _letter(record: Any) -> DeadLetter | None:
    try:
        body = orjson.loads(record.value)
        raw = base64.b64decode(body.get("raw_b64", ""))
        return DeadLetter(
            dlq_partition=record.partition,
            dlq_offset=record.offset,
            reason=str(body["reason"]),
            detail=str(body.get("detail", "")),
            topic=str(body.get("topic", "")),
            partition=int(body.get("partition", -1)),
            offset=int(body.get("offset", -1)),
            raw=raw,
            raw_bytes=int(body.get("raw_bytes", len(raw))),
            truncated=bool(body.get("raw_truncated", False)),
            timestamp_ms=record.timestamp,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # not one of ours: nothing to show


async def _read_async(bootstrap: str, topic: str) -> list[DeadLetter]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**client_kwargs(bootstrap, enable_auto_commit=False, group_id=None))
    try:
        await consumer.start()
        await consumer.topics()  # fetches the cluster's metadata
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[DeadLetter] = []
        idle = 0
        # Read up to each partition's high-water mark as fetches report it (the embedded broker's ListOffsets
        # under-reports the end of a multi-record batch, so end_offsets() is not trusted); an empty partition
        # reports none: three empty polls in a row end the read.
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=500)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                out.extend(letter for r in records if (letter := _letter(r)) is not None)
            marks = [consumer.highwater(tp) for tp in tps]
            if all(m is not None for m in marks) and all(
                [await consumer.position(tp) >= m for tp, m in zip(tps, marks, strict=True)]
            ):
                break
        return sorted(out, key=lambda d: (d.dlq_partition, d.dlq_offset))
    finally:
        await consumer.stop()


def read(bootstrap: str, topic: str, reason: str | None = None, contains: str | None = None) -> list[DeadLetter]:
    """Every dead letter of `topic` (from its beginning to its end now), optionally of one reason, or whose
    detail or raw bytes contain a text."""
    from batchmark.broker import check_reachable

    check_reachable(bootstrap)
    letters = asyncio.run(_read_async(bootstrap, topic))
    if reason:
        letters = [d for d in letters if d.reason == reason]
    if contains:
        needle = contains.encode()
        letters = [d for d in letters if contains in d.detail or needle in d.raw]
    return letters


def redriven_sources(url: str) -> set[tuple[str, int, int]]:
    """The source positions (topic, partition, offset) of the records already re-driven."""
    with storage.transaction(url) as cur:
        cur.execute("SELECT source_topic, source_partition, source_offset FROM stream.redriven")
        return {(t, int(p), int(o)) for t, p, o in cur.fetchall()}


@dataclass
class RedriveOutcome:
    """What a re-drive did: sent (position -> event id), skipped (position -> why not)."""

    sent: dict[str, str]
    skipped: dict[str, str]


def redrive(url: str, bootstrap: str, dlq_topic: str, defs: Definitions, letters: list[DeadLetter]) -> RedriveOutcome:
    """Send the chosen dead letters that the definitions now accept back to the topic they came from, byte for
    byte.

    Skipped, with the reason: a record already re-driven (by its source position, so a record dead-lettered twice
    goes back once), one whose raw bytes were cut (too large to keep whole), one the definitions still reject.
    The re-driven records are written in a transaction that commits only once the broker acknowledged every
    record: a failed send records nothing (re-drive again). Only a crash between the acknowledgement and the
    commit can send a record twice; the batch still keeps one copy (same event id) and the stream's second copy
    shows as a duplicate in the day's accuracy figures."""
    ds = defs.dataset
    done = redriven_sources(url)
    outcome = RedriveOutcome({}, {})
    chosen: list[tuple[DeadLetter, dict[str, Any]]] = []
    for d in letters:
        if d.source in done:
            outcome.skipped[d.position] = f"already re-driven ({d.topic} partition {d.partition} offset {d.offset})"
            continue
        if not d.topic:
            outcome.skipped[d.position] = "it does not say which topic it came from"
            continue
        if d.truncated:
            outcome.skipped[d.position] = f"its {d.raw_bytes} bytes were not kept whole in the dead letter"
            continue
        obj = decode(d.raw)
        checked = obj if isinstance(obj, Rejection) else validate_record(obj, ds)
        if isinstance(checked, Rejection):
            outcome.skipped[d.position] = f"still rejected: {checked.reason}: {checked.detail}"
            continue
        chosen.append((d, obj))
        done.add(d.source)  # the same record dead-lettered twice in this selection goes back once
    if not chosen:
        return outcome

    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**client_kwargs(bootstrap, acks="all", linger_ms=5))
        await producer.start()
        try:
            futures = []
            for d, obj in chosen:
                key = obj.get(ds.partition_key)
                ts = parse_event_time(obj.get(ds.event_time))
                futures.append(
                    await producer.send(d.topic, d.raw, key=None if key is None else str(key).encode(), timestamp_ms=ts)
                )
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    with storage.transaction(url) as cur:
        for d, obj in chosen:
            cur.execute(
                """INSERT INTO stream.redriven (source_topic, source_partition, source_offset, dlq_topic,
                       dlq_partition, dlq_offset, event_id) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                (d.topic, d.partition, d.offset, dlq_topic, d.dlq_partition, d.dlq_offset, str(obj.get(ds.event_id))),
            )
        asyncio.run(send())  # commits only when every record is acknowledged
    outcome.sent = {d.position: str(obj.get(ds.event_id)) for d, obj in chosen}
    return outcome
