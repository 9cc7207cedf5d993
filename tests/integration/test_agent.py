"""The stream worker's Faust agent in-process (Faust's test_context), on the embedded broker and Postgres: a
fetched batch is validated, folded and dead-lettered; two apps built with different definitions and consumer
groups live side by side in one process without sharing state."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
from aiokafka import TopicPartition

from batchmark import config
from batchmark.broker import ensure_settings_topics
from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from streaming.app import create_app
from streaming.worker import FetchedBatch
from tests.integration.test_pipeline import _read_topic

T0 = 1_790_000_000_000


@dataclasses.dataclass
class _Record:  # what aiokafka's getmany hands over, the fields the agent reads
    partition: int
    offset: int
    value: bytes
    key: bytes = b"acme"
    timestamp: int = T0


def _job(i: int) -> bytes:
    return orjson.dumps(
        {"event_id": f"ag-{i}", "event_time": T0 + i * 1000, "tenant": "acme", "user": f"u{i % 3}", "job_id": f"j{i}",
         "cpu": 2.0, "mem_gb": 4.0, "duration_s": 10.0}
    )  # fmt: skip


async def _feed(app, topic: str, records: list[_Record]) -> FetchedBatch:  # noqa: ANN001
    batch = FetchedBatch({TopicPartition(topic, 0): records}, asyncio.get_running_loop().create_future())
    async with app.worker_state.agent.test_context() as agent:
        await agent.put(batch)
        await asyncio.wait_for(batch.done, 30)  # the agent resolves it once the whole batch is processed
        await app.producer.flush()
    return batch


def test_the_agent_folds_a_fetched_batch_and_dead_letters_the_bad_record(pg_url: str, broker) -> None:  # noqa: ANN001
    settings = dataclasses.replace(config.load(), events_topic="agent-test", dlq_topic="agent-test.dlq")
    ensure_settings_topics(settings)
    app = create_app(settings, app_id="agent-test")
    worker = app.worker_state
    worker.processor.assign(0)
    records = [_Record(0, i, _job(i)) for i in range(5)] + [_Record(0, 5, b'{"event_id": "ag-x", "cpu": ')]

    async def run() -> None:
        await _feed(app, settings.events_topic, records)
        await app.producer.stop()

    asyncio.run(run())
    s = worker.processor.summary()
    assert (s["processed"], s["valid"], s["rejected"]) == (6, 5, 1)
    jobs = [slot for key, slot in worker.processor.partitions[0].state.metrics[0].windows.items()]
    assert sum(n for _, n, _ in jobs) == 5  # the five valid jobs are in the open `jobs` windows
    [dead] = asyncio.run(_read_topic(settings.bootstrap_servers, settings.dlq_topic, 1))
    assert dead["reason"] == "invalid_json" and (dead["partition"], dead["offset"]) == (0, 5)


def test_two_apps_with_different_definitions_and_groups_run_side_by_side(pg_url: str, broker) -> None:  # noqa: ANN001
    stable_settings = dataclasses.replace(config.load(), events_topic="side-a", dlq_topic="side-a.dlq")
    taxi = REPO_ROOT / "examples" / "taxi" / "metrics.toml"
    candidate_settings = dataclasses.replace(
        config.load(), events_topic="side-b", dlq_topic="side-b.dlq", definitions_path=taxi
    )
    for s in (stable_settings, candidate_settings):
        ensure_settings_topics(s)
    stable = create_app(stable_settings, app_id="stable")
    candidate = create_app(candidate_settings, load_definitions(taxi), app_id="candidate", group="candidate-v2")
    a, b = stable.worker_state, candidate.worker_state
    assert (a.group, b.group) == ("stable-events", "candidate-v2")
    assert a.processor is not b.processor and a.lock is not b.lock and a.batches is not b.batches
    assert {m.name for m in a.defs.metrics} != {m.name for m in b.defs.metrics}
    a.processor.assign(0)
    b.processor.assign(0)

    async def run() -> None:
        await _feed(stable, "side-a", [_Record(0, i, _job(i)) for i in range(3)])
        await stable.producer.stop()

    asyncio.run(run())
    assert a.processor.summary()["valid"] == 3 and b.processor.summary()["processed"] == 0  # nothing shared
