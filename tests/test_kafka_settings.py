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
    for path in [*Path(REPO_ROOT / "batchmark").glob("*.py"), REPO_ROOT / "streaming" / "app.py"]:
        text = path.read_text()
        for m in re.finditer(r"AIOKafka(Producer|Consumer|AdminClient)\(([^)]*)", text):
            if "client_kwargs" not in m.group(2) and not m.group(2).strip().startswith("**"):
                offenders.append(f"{path.name}: {m.group(0)[:60]}")
        if "faust.App(" in text and "broker_credentials=" not in text:
            offenders.append(f"{path.name}: faust.App without broker_credentials")
    assert offenders == []
