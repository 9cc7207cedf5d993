"""Kafka clients' security settings: one place, from KAFKA_* variables, checked with messages that say what to set."""

from __future__ import annotations

import ssl
from pathlib import Path

import certifi
import faust
import pytest

from batchmark.errors import ConfigError
from batchmark.kafka import client_kwargs, security_from_env


def test_plaintext_by_default() -> None:
    sec = security_from_env({})
    assert sec.protocol == "PLAINTEXT" and sec.ssl_context() is None and sec.faust_credentials() is None
    assert sec.client_kwargs() == {"security_protocol": "PLAINTEXT", "request_timeout_ms": 30_000}


def test_sasl_ssl_with_scram_verifies_the_brokers_and_keeps_the_password_out_of_reprs() -> None:
    sec = security_from_env(
        {
            "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "batchmark",
            "KAFKA_SASL_PASSWORD": "s3cret",
            "KAFKA_SSL_CAFILE": certifi.where(),
            "KAFKA_REQUEST_TIMEOUT_MS": "45000",
        }
    )
    kwargs = sec.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("batchmark", "s3cret")
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert kwargs["request_timeout_ms"] == 45_000
    assert "s3cret" not in repr(sec)
    creds = sec.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials) and creds.protocol.value == "SASL_SSL"


def test_ssl_alone_gives_faust_ssl_credentials_and_overrides_win() -> None:
    import os

    sec = security_from_env({"KAFKA_SECURITY_PROTOCOL": "SSL"})
    assert isinstance(sec.faust_credentials(), faust.SSLCredentials)
    os.environ["KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
    try:
        kwargs = client_kwargs("127.0.0.1:9092", request_timeout_ms=3000, acks=1)
    finally:
        os.environ.pop("KAFKA_SECURITY_PROTOCOL")
    assert kwargs == {
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "PLAINTEXT",
        "request_timeout_ms": 3000,
        "acks": 1,
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u"},
            "KAFKA_SASL_MECHANISM='GSSAPI' is not one of PLAIN",
        ),
        ({"KAFKA_SASL_USERNAME": "u"}, "KAFKA_SASL_\\* is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nope/ca.pem"},
            "KAFKA_SSL_CAFILE=/nope/ca.pem does not",
        ),
        ({"KAFKA_SSL_CAFILE": certifi.where()}, "KAFKA_SSL_\\* is set but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": certifi.where()},
            "KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE",
        ),
        ({"KAFKA_REQUEST_TIMEOUT_MS": "5s"}, "KAFKA_REQUEST_TIMEOUT_MS must be a whole number"),
    ],
)
def test_settings_that_cannot_work_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        security_from_env(env)


def test_every_kafka_client_in_the_product_connects_through_client_kwargs() -> None:
    """No client is built with its own connection settings (they would miss TLS and SASL)."""
    import re

    from batchmark.config import REPO_ROOT

    offenders = []
    streaming = [REPO_ROOT / "streaming" / "app.py", REPO_ROOT / "streaming" / "worker.py"]
    for path in [*Path(REPO_ROOT / "batchmark").glob("*.py"), *streaming]:
        text = path.read_text()
        for m in re.finditer(r"(AIOKafka(?:Producer|Consumer|AdminClient)|raw_records_consumer)\(([^)]*)", text):
            if "client_kwargs" not in m.group(2) and not m.group(2).strip().startswith("**"):
                offenders.append(f"{path.name}: {m.group(0)[:60]}")
        if "faust.App(" in text and "broker_credentials=" not in text:
            offenders.append(f"{path.name}: faust.App without broker_credentials")
    assert offenders == []


def test_the_raw_records_consumer_hands_out_aiokafkas_records_and_only_its_own(broker) -> None:  # noqa: ANN001
    """The events fetcher's consumer skips the ConsumerRecord copy; the records keep every field the stream
    processor reads, in plain and compressed batches, tombstones included; another consumer is unchanged."""
    import asyncio
    import uuid

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.structs import ConsumerRecord

    from batchmark.kafka import raw_records_consumer

    topic = f"raw-records-{uuid.uuid4().hex[:8]}"
    sent: list[tuple[int, bytes | None, bytes | None, int]] = []

    async def run() -> tuple[list, list, bool]:
        for codec in (None, "lz4"):
            producer = AIOKafkaProducer(**client_kwargs(broker.bootstrap, compression_type=codec, linger_ms=20))
            await producer.start()
            try:
                futures = []
                for i in range(50):
                    value = None if i == 7 else f'{{"i":{i},"codec":"{codec}"}}'.encode()
                    key = f"k{i % 3}".encode() if i % 5 else None
                    ts = 1_700_000_000_000 + len(sent) + i
                    futures.append(
                        (key, value, ts, await producer.send(topic, value, key=key, partition=0, timestamp_ms=ts))
                    )
                for key, value, ts, fut in futures:
                    meta = await fut
                    sent.append((meta.offset, key, value, ts))
            finally:
                await producer.stop()
        tp = TopicPartition(topic, 0)
        got: dict[str, list] = {}
        raw_ok = False
        for name, consumer in (
            ("raw", raw_records_consumer(**client_kwargs(broker.bootstrap, enable_auto_commit=False))),
            ("plain", AIOKafkaConsumer(**client_kwargs(broker.bootstrap, enable_auto_commit=False))),
        ):
            await consumer.start()
            try:
                if name == "raw":
                    raw_ok = consumer.uses_raw_records
                consumer.assign([tp])
                consumer.seek(tp, 0)
                records: list = []
                for _ in range(30):  # a deadline: a record missing fails below instead of hanging
                    records += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
                    if len(records) >= len(sent):
                        break
                got[name] = records
            finally:
                await consumer.stop()
        return got["raw"], got["plain"], raw_ok

    raw, plain, raw_ok = asyncio.run(run())
    assert raw_ok
    assert not any(isinstance(r, ConsumerRecord) for r in raw)  # the copy is skipped...
    assert all(isinstance(r, ConsumerRecord) for r in plain)  # ...for this consumer only
    expected = sorted(sent)
    assert [(r.offset, r.key, r.value, r.timestamp) for r in raw] == expected
    assert [(r.offset, r.key, r.value, r.timestamp) for r in plain] == expected
    assert sum(r.value is None for r in raw) == 2  # the tombstones stay None (the processor dead-letters them)
