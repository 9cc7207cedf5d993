"""Shared fixture of the integration tests: a generated day streamed through the real broker and Faust worker."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from batchmark import config
from batchmark.broker import ensure_settings_topics
from batchmark.definitions import load_definitions
from batchmark.demo import start_worker, stop, wait_for_day, wait_until_ready
from batchmark.generator import GeneratorConfig, Manifest, generate
from batchmark.replay import replay


@contextmanager
def running_worker(settings, home: Path, name: str):  # noqa: ANN001, ANN201
    """A Faust worker on the settings' topics, ready; yields (process, log path); stopped afterwards."""
    log = home / f"worker-{name}.log"
    worker = start_worker(settings, log)
    try:
        wait_until_ready(worker, log)
        yield worker, log
    finally:
        stop(worker)


@contextmanager
def environment(**values: str | None):  # noqa: ANN201
    """os.environ with these values (None: unset) inside the block, and as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def streamed_day(topic: str, day: date, home: Path, **gen: object):  # noqa: ANN201
    """Generate `day` (with its archive), stream it on its own topics, yield (settings, defs, manifest, worker)."""
    with environment(BATCHMARK_EVENTS_TOPIC=topic, BATCHMARK_DLQ_TOPIC=f"{topic}.dlq"):
        settings = config.load()
        defs = load_definitions(settings.definitions_path)
        ensure_settings_topics(settings)
        data = home / f"{topic}-{day}.jsonl"
        manifest: Manifest = generate(
            GeneratorConfig(day=day, partitions=settings.partitions, **gen), data, archive=settings.archive_file(day)
        )
        with running_worker(settings, home, topic) as (worker, log):
            replay(data, settings.bootstrap_servers, settings.events_topic, defs, progress=False)
            lateness = max(m.allowed_lateness_ms for m in defs.metrics)
            wait_for_day(settings, day, lateness, worker, log, timeout_s=240)
            yield settings, defs, manifest, worker


@contextmanager
def replayed_file(path: Path, home: Path, topic: str, definitions: Path, until: date):  # noqa: ANN201
    """Replay a file through a worker on its own topic (dead letters to `<topic>.dlq`) with these definitions,
    until the day `until` is closed; yield (settings, defs, replay stats) with that environment in force."""
    with environment(BATCHMARK_DEFINITIONS=str(definitions), BATCHMARK_EVENTS_TOPIC=topic, BATCHMARK_DLQ_TOPIC=None):
        settings = config.load()
        defs = load_definitions(settings.definitions_path)
        with running_worker(settings, home, topic) as (worker, log):
            stats = replay(path, settings.bootstrap_servers, settings.events_topic, defs, progress=False)
            lateness = max(m.allowed_lateness_ms for m in defs.metrics)
            wait_for_day(settings, until, lateness, worker, log, timeout_s=240)
        yield settings, defs, stats
