"""Topics are created with the configured partitions, never left to the broker's auto-creation; an events topic
with another partition count is refused with what to change; each events topic has its own dead-letter topic."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os

import pytest

from batchmark import config
from batchmark.broker import create_topics
from batchmark.cli import main
from batchmark.errors import ConfigError


async def _partitions(bootstrap: str, topic: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [found] = await admin.describe_topics([topic])
        return len(found["partitions"])
    finally:
        await admin.close()


def test_topics_have_the_configured_partitions_and_a_mismatch_is_refused(broker, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("BATCHMARK_EVENTS_TOPIC", "orders")
    monkeypatch.delenv("BATCHMARK_DLQ_TOPIC", raising=False)
    monkeypatch.setenv("BATCHMARK_PARTITIONS", "3")
    settings = config.load()
    assert settings.dlq_topic == "orders.dlq"  # its own dead-letter topic
    assert main(["topics"]) == 0
    assert asyncio.run(_partitions(broker.bootstrap, "orders")) == 3
    assert asyncio.run(_partitions(broker.bootstrap, "orders.dlq")) == 1

    # the replayer creates a topic it sends to (with the configured count), before the first record
    data = tmp_path / "one.jsonl"
    data.write_text('{"event_id": "a"}\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["replay", str(data), "--topic", "orders-replayed"]) == 0
    # a replay says what the worker will refuse, instead of only "replayed 1 records"
    assert "replayed 1 records" in out.getvalue()
    assert "1 of them do not fit" in out.getvalue() and "(missing_field 1)" in out.getvalue()
    assert "`batchmark dlq` lists them" in out.getvalue()
    assert asyncio.run(_partitions(broker.bootstrap, "orders-replayed")) == 3

    monkeypatch.setenv("BATCHMARK_PARTITIONS", "2")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["topics"]) == 2
    assert "topic 'orders' has 3 partitions" in err.getvalue() and "set BATCHMARK_PARTITIONS=3" in err.getvalue()
    with pytest.raises(ConfigError, match="has 3 partitions"):
        create_topics(broker.bootstrap, {"orders": 2}, keyed=("orders",))
    create_topics(broker.bootstrap, {"orders.dlq": 4})  # a dead-letter topic is not keyed: left as it is
    assert os.environ["BATCHMARK_PARTITIONS"] == "2"


def test_the_security_settings_reach_every_client(broker, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The embedded broker speaks PLAINTEXT only: with SASL configured, topic management, the dead-letter reader
    and the replayer all fail at the SASL handshake, so each of them used the setting."""

    from aiokafka.errors import KafkaConnectionError as AioConnectionError

    from batchmark import dlq
    from batchmark.definitions import load_definitions
    from batchmark.replay import replay

    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "batchmark")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "secret")
    with pytest.raises(AioConnectionError):
        create_topics(broker.bootstrap, {"secured": 1})
    with pytest.raises(AioConnectionError):
        dlq.read(broker.bootstrap, "secured.dlq")
    data = tmp_path / "one.jsonl"
    data.write_text('{"event_id": "a"}\n')
    with pytest.raises(AioConnectionError):
        replay(data, broker.bootstrap, "secured", load_definitions(config.load().definitions_path), progress=False)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    monkeypatch.delenv("KAFKA_SASL_USERNAME")
    monkeypatch.delenv("KAFKA_SASL_PASSWORD")
    create_topics(broker.bootstrap, {"secured": 1})  # the same calls, in the clear, work
