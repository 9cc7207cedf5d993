"""Every Kafka client's connection settings, from one place: the environment.

The Faust worker, its event fetcher, the replayer, the dead-letter reader and topic management all connect with
``client_kwargs`` (aiokafka) or ``faust_kwargs`` (Faust), so pointing batchmark at a secured cluster is a
matter of environment variables, the same for every process:

    KAFKA_BOOTSTRAP_SERVERS     host:port[,host:port]
    KAFKA_SECURITY_PROTOCOL     PLAINTEXT (default) | SSL | SASL_PLAINTEXT | SASL_SSL
    KAFKA_SASL_MECHANISM        PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512      (with SASL_*)
    KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD                               (with SASL_*)
    KAFKA_SSL_CAFILE            the CA bundle that signed the brokers' certificates (with SSL / SASL_SSL;
                                default: the system's)
    KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE                                  a client certificate (mutual TLS)
    KAFKA_REQUEST_TIMEOUT_MS    30000

A setting that cannot work (an unknown protocol, SASL without a user, a file that does not exist) is refused
when the settings are read, saying what to set.
"""

from __future__ import annotations

import os
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchmark.errors import ConfigError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How clients authenticate and encrypt: the environment's KAFKA_* settings, checked."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = 30_000

    @property
    def uses_ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL and SASL_SSL (verifying the brokers' certificates and host names)."""
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin) besides bootstrap_servers."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol, "request_timeout_ms": self.request_timeout_ms}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        return kwargs

    def faust_credentials(self) -> Any:
        """Faust's broker_credentials for this setting (None for PLAINTEXT)."""
        import faust

        if self.uses_sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context(),
            )
        if self.uses_ssl:
            return faust.SSLCredentials(self.ssl_context())
        return None


def security_from_env(env: dict[str, str] | None = None) -> KafkaSecurity:
    """The KAFKA_* settings of the environment, checked; every problem says what to set."""
    env = os.environ if env is None else env

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    protocol = (get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    mechanism = get("KAFKA_SASL_MECHANISM")
    username, password = get("KAFKA_SASL_USERNAME"), get("KAFKA_SASL_PASSWORD")
    if protocol.startswith("SASL_"):
        mechanism = (mechanism or "PLAIN").upper()
        if mechanism not in MECHANISMS:
            raise ConfigError(f"KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(MECHANISMS)}")
        if not username or not password:
            raise ConfigError(f"{protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    elif mechanism or username:
        raise ConfigError(
            f"KAFKA_SASL_* is set but KAFKA_SECURITY_PROTOCOL is {protocol}: use SASL_PLAINTEXT or SASL_SSL"
        )
    files = {name: get(name) for name in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE")}
    for name, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}={path} does not exist")
    if files["KAFKA_SSL_KEYFILE"] and not files["KAFKA_SSL_CERTFILE"]:
        raise ConfigError("KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE (the client certificate it belongs to)")
    if any(files.values()) and protocol not in ("SSL", "SASL_SSL"):
        raise ConfigError(f"KAFKA_SSL_* is set but KAFKA_SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
    timeout = get("KAFKA_REQUEST_TIMEOUT_MS") or "30000"
    if not timeout.isdigit() or int(timeout) < 1000:
        raise ConfigError(f"KAFKA_REQUEST_TIMEOUT_MS must be a whole number of milliseconds >= 1000, got {timeout!r}")
    return KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=mechanism if protocol.startswith("SASL_") else None,
        sasl_username=username,
        sasl_password=password,
        ssl_cafile=files["KAFKA_SSL_CAFILE"],
        ssl_certfile=files["KAFKA_SSL_CERTFILE"],
        ssl_keyfile=files["KAFKA_SSL_KEYFILE"],
        request_timeout_ms=int(timeout),
    )


def client_kwargs(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Everything an aiokafka client needs to connect to `bootstrap` with the environment's security settings;
    `overrides` (timeouts, batching) win."""
    return {"bootstrap_servers": bootstrap, **security_from_env().client_kwargs(), **overrides}


async def log_holds(bootstrap: str, tp: Any, offset: int, timeout_ms: int = 3000) -> bool | None:
    """Whether a partition's log still holds `offset` (a record at or after it can be fetched), read with a
    throwaway consumer of no group; None when the broker could not be asked. A log that starts after it or ends
    before it is out of range: False."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError, OffsetOutOfRangeError

    consumer = AIOKafkaConsumer(
        **client_kwargs(bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="none")
    )
    try:
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        if batch.get(tp):
            return True
        mark = consumer.highwater(tp)  # nothing fetched: a control record, or the end of the log
        return mark is not None and mark > offset
    except OffsetOutOfRangeError:
        return False
    except KafkaError:
        return None
    finally:
        await consumer.stop()


def _raw_record(tp: Any, record: Any) -> Any:
    return record


class _RawResults(OrderedDict):
    """A fetcher's buffer of fetched partitions whose records come out as aiokafka's own record objects."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        records = getattr(result, "_partition_records", None)
        if records is not None and hasattr(records, "_consumer_record"):
            records._consumer_record = _raw_record
        super().__setitem__(tp, result)


def raw_records_consumer(**kwargs: Any) -> Any:
    """An aiokafka consumer whose ``getmany`` returns the record objects aiokafka decodes (``offset``, ``key``,
    ``value``, ``timestamp``, ``headers``; no ``topic`` or ``partition``: the dict's key has them) instead of
    building a ``ConsumerRecord`` for each: that copy was an eighth of the stream worker's CPU (bench/stream).

    Per consumer: only this instance's fetcher is changed, so Faust's consumers in the same process are not.
    Fetches buffered before the hook took are switched as well; no deserializers (bytes in, bytes out).
    ``uses_raw_records`` tells whether the hook took (tests check it on the pinned aiokafka).
    """
    from aiokafka import AIOKafkaConsumer

    if kwargs.get("key_deserializer") or kwargs.get("value_deserializer"):
        raise ConfigError("raw_records_consumer returns bytes: deserialize in the caller")

    class RawRecordsConsumer(AIOKafkaConsumer):
        async def start(self) -> None:
            await super().start()
            fetcher = getattr(self, "_fetcher", None)
            buffered = getattr(fetcher, "_records", None)
            if isinstance(buffered, dict):  # aiokafka's buffer of fetched partitions (an OrderedDict)
                raw = _RawResults()
                for tp, result in list(buffered.items()):
                    raw[tp] = result
                fetcher._records = raw

        @property
        def uses_raw_records(self) -> bool:
            return isinstance(getattr(getattr(self, "_fetcher", None), "_records", None), _RawResults)

    return RawRecordsConsumer(**kwargs)
