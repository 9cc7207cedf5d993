#!/usr/bin/env python
"""Plain Faust: the ceiling of a Faust agent on this machine (bench/stream/run.py starts it).

A do-nothing agent on Faust's own consumer: raw bytes in, no decoding, no state, no output -- it only counts.
Whatever the product does per event costs on top of this; whatever this costs, no Faust app avoids.

    python plain_app.py worker -l info --without-web

Settings and the status file are the textbook app's (BENCH_BROKER, BENCH_APP_ID, BENCH_IN_TOPIC,
BENCH_PARTITIONS, BENCH_STATUS); ``aggregated`` in the status counts the events seen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import faust

BROKER = os.environ.get("BENCH_BROKER", "kafka://127.0.0.1:19092")
APP_ID = os.environ.get("BENCH_APP_ID", "plain-faust")
IN_TOPIC = os.environ.get("BENCH_IN_TOPIC", "textbook-events")
PARTITIONS = int(os.environ.get("BENCH_PARTITIONS", "2"))
STATUS = Path(os.environ.get("BENCH_STATUS", "plain-status.json"))

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
events_topic = app.topic(IN_TOPIC, value_type=bytes, value_serializer="raw", key_serializer="raw")
stats: dict = {"aggregated": 0, "first_wall": None, "last_wall": None}


@app.agent(events_topic)
async def count(events: faust.Stream[bytes]) -> None:
    async for _ in events:
        if stats["first_wall"] is None:
            stats["first_wall"] = time.time()
        stats["aggregated"] += 1
        stats["last_wall"] = time.time()


@app.timer(interval=0.5)
async def write_status() -> None:
    STATUS.write_text(json.dumps(stats))


if __name__ == "__main__":
    app.main()
