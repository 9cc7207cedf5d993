"""batchmark stream worker: events topic -> validate -> DLQ | lake + windowed metrics -> Postgres.

Run it:   faust -A streaming.app worker --without-web -l info     (or: batchmark worker)
It logs one line per checkpoint with records processed, rejected, windows written and the watermark.

``create_app`` builds a Faust app wired to its own StreamWorker (streaming/worker.py: the fetcher, the agent, the
rebalance listener); all the logic lives in batchmark.stream_processor. Building an app touches no service: the
schema check and topic creation run when the worker starts. The module-level ``app`` is what the Faust CLI runs,
with the settings and definitions of the environment (and bench/stream's statistics when BATCHMARK_BENCH_STATS
names a file).
"""

from __future__ import annotations

import os
from typing import Any

import faust

from batchmark import config
from batchmark.config import Settings
from batchmark.definitions import Definitions, load_definitions
from batchmark.kafka import security_from_env
from batchmark.stream_processor import READY_LINE
from streaming.worker import Knobs, StreamWorker, WorkerHooks

__all__ = ["READY_LINE", "create_app", "app"]


def create_app(
    settings: Settings | None = None,
    definitions: Definitions | None = None,
    hooks: WorkerHooks | None = None,
    app_id: str = "batchmark-stream",
    group: str | None = None,
    knobs: Knobs | None = None,
) -> faust.App:
    """A Faust app running one stream worker over `settings` and `definitions` (the environment's by default);
    `group` names the fetcher's consumer group (default ``<app_id>-events``). The worker is ``app.worker_state``."""
    settings = settings or config.load()
    definitions = definitions or load_definitions(settings.definitions_path, version=settings.version)
    app = faust.App(
        app_id,
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
    app.worker_state = StreamWorker(app, settings, definitions, knobs or Knobs.from_env(), hooks, group)
    return app


def _hooks_from_env(knobs: Knobs) -> Any:
    """The worker's statistics file when BATCHMARK_BENCH_STATS names one (bench/stream and the Kappa comparison
    start workers so); BATCHMARK_STATE_BYTES=1 adds each closed window's state size."""
    path = os.environ.get("BATCHMARK_BENCH_STATS")
    if not path:
        return None
    from streaming.stats import BenchStats

    return BenchStats(path, knobs, state_bytes=os.environ.get("BATCHMARK_STATE_BYTES") == "1")


_knobs = Knobs.from_env()
app = create_app(
    hooks=_hooks_from_env(_knobs),
    # a Faust app id is also Faust's own consumer group: another deployment on the same broker (a Kappa
    # comparison's workers) takes its own, so it never rebalances production's
    app_id=os.environ.get("BATCHMARK_APP_ID", "").strip() or "batchmark-stream",
    group=os.environ.get("BATCHMARK_CONSUMER_GROUP", "").strip() or None,
    knobs=_knobs,
)
EVENTS_GROUP = app.worker_state.group
