#!/usr/bin/env python
"""Textbook Faust app: the baseline of the stream benchmark (bench/stream/run.py starts it).

Written the way the Faust docs teach it (User Guide: Models, Agents, Tables and Windowing):

- events are JSON, decoded into a ``faust.Record`` model (``Event``) by the topic's value serializer;
- the stream is repartitioned by tenant with ``group_by`` (an internal repartition topic);
- two tumbling windowed tables per tenant per 1-minute *event-time* window (``relative_to_field``):
  ``jobs`` (count) and ``cpu_seconds`` (sum of cpu * duration_s), each backed by a changelog topic;
- every event is forwarded to a second topic (one output record per event).

Run it like the Faust examples (settings come from the BENCH_* environment variables, see below)::

    python textbook_app.py worker -l info --without-web

It prints (logs) one line every 5 s with the events consumed, the events aggregated and the rate. Every
0.5 s it writes a status file (BENCH_STATUS: counts and the wall times of the first and last event) and,
once the file BENCH_DUMP_REQUEST exists, it writes the tables' per-window values to BENCH_DUMP as JSON:
``[[metric, tenant, window_start_ms, value], ...]`` -- the harness compares them with the product's.

Faust's windowed tables expire windows against the wall clock, so the benchmark generates events with
event times in the recent past and sets ``expires`` to hours.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import faust

BROKER = os.environ.get("BENCH_BROKER", "kafka://127.0.0.1:19092")
APP_ID = os.environ.get("BENCH_APP_ID", "textbook-jobs")
IN_TOPIC = os.environ.get("BENCH_IN_TOPIC", "textbook-events")
OUT_TOPIC = os.environ.get("BENCH_OUT_TOPIC", "textbook-events-out")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "2"))
STATUS = Path(os.environ.get("BENCH_STATUS", "textbook-status.json"))
DUMP = Path(os.environ.get("BENCH_DUMP", "textbook-dump.json"))
DUMP_REQUEST = Path(os.environ.get("BENCH_DUMP_REQUEST", "textbook-dump.request"))


class Event(faust.Record, isodates=True, serializer="json"):
    """One cluster job, as the producer wrote it."""

    event_id: str
    event_time: datetime
    tenant: str
    user: str
    job_id: str
    cpu: float
    mem_gb: float
    duration_s: float


app = faust.App(
    APP_ID,
    broker=BROKER,
    store="memory://",
    topic_partitions=PARTITIONS,
    consumer_auto_offset_reset="earliest",
    broker_rebalance_timeout=10,  # group joins take half of it on the embedded broker (STACK_FACTS)
    broker_session_timeout=10,
    broker_heartbeat_interval=1,
    web_host="127.0.0.1",
)

events_topic = app.topic(IN_TOPIC, value_type=Event, partitions=PARTITIONS)
out_topic = app.topic(OUT_TOPIC, value_type=Event, partitions=PARTITIONS)

WINDOW = 60.0
jobs = (
    app.Table("jobs", default=int, partitions=PARTITIONS)
    .tumbling(WINDOW, expires=timedelta(hours=6))
    .relative_to_field(Event.event_time)
)
cpu_seconds = (
    app.Table("cpu_seconds", default=float, partitions=PARTITIONS)
    .tumbling(WINDOW, expires=timedelta(hours=6))
    .relative_to_field(Event.event_time)
)

stats = {"aggregated": 0, "first_wall": None, "last_wall": None, "dumped": False}


@app.agent(events_topic)
async def count_jobs(events: faust.Stream[Event]) -> None:
    async for event in events.group_by(Event.tenant):
        if stats["first_wall"] is None:
            stats["first_wall"] = time.time()
        jobs[event.tenant] += 1
        cpu_seconds[event.tenant] += event.cpu * event.duration_s
        await out_topic.send(key=event.tenant, value=event)
        stats["aggregated"] += 1
        stats["last_wall"] = time.time()


@app.timer(interval=0.5)
async def write_status() -> None:
    STATUS.write_text(json.dumps(stats))
    if DUMP_REQUEST.exists() and not stats["dumped"]:
        rows = []
        for name, table in (("jobs", jobs), ("cpu_seconds", cpu_seconds)):
            for (tenant, (start, _end)), value in table.table.data.items():
                rows.append([name, tenant, round(start * 1000), value])
        tmp = DUMP.with_name(DUMP.name + ".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, DUMP)
        stats["dumped"] = True


_last = [0.0, 0]


@app.timer(interval=5.0)
async def report() -> None:
    now, n = time.monotonic(), stats["aggregated"]
    if _last[0]:
        print(f"textbook: aggregated={n} rate={(n - _last[1]) / (now - _last[0]):,.0f} events/s", flush=True)
    _last[:] = [now, n]


if __name__ == "__main__":
    app.main()
