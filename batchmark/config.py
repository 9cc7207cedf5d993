"""Configuration in one place: every setting is an environment variable with a default for local runs."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class Settings:
    """Where every service and file lives. Built from the environment by :func:`load`."""

    home: Path
    bootstrap_servers: str
    database_url: str
    lake: Path
    spark_master: str
    airflow_home: Path
    definitions_path: Path
    gx_root: Path
    archive: Path
    events_topic: str = "events"
    dlq_topic: str = "events.dlq"
    partitions: int = 2
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL in the form SQLAlchemy (GX, Airflow) wants."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg2://" + url[len(prefix) :]
        return url

    @property
    def events_lake(self) -> Path:
        return self.lake / "events"

    def archive_file(self, day: object) -> Path:
        """The system of record for a day (every valid event once), when the source keeps one."""
        return self.archive / f"events-{day}.jsonl"


def default_database_url(home: Path) -> str:
    """The database a runtime home uses unless DATABASE_URL says otherwise: its own, named after the home.

    Two checkouts (or the demo beside `batchmark up`) therefore never overwrite each other's days.
    """
    tag = hashlib.sha256(str(home).encode()).hexdigest()[:8]
    return f"postgresql://postgres@127.0.0.1:5432/batchmark_{tag}"


def load() -> Settings:
    """Read the settings from the environment (defaults: everything on 127.0.0.1 under ./.batchmark)."""
    home = Path(_env("BATCHMARK_HOME", str(REPO_ROOT / ".batchmark"))).resolve()
    return Settings(
        home=home,
        bootstrap_servers=_env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        database_url=_env("DATABASE_URL", default_database_url(home)),
        lake=Path(_env("BATCHMARK_LAKE", str(home / "lake"))).resolve(),
        spark_master=_env("SPARK_MASTER", "local[*]"),
        airflow_home=Path(_env("AIRFLOW_HOME", str(home / "airflow"))).resolve(),
        definitions_path=Path(_env("BATCHMARK_DEFINITIONS", str(REPO_ROOT / "batchmark" / "metrics.toml"))),
        gx_root=Path(_env("BATCHMARK_GX_ROOT", str(REPO_ROOT / "expectations"))).resolve(),
        archive=Path(_env("BATCHMARK_ARCHIVE", str(home / "archive"))).resolve(),
        events_topic=_env("BATCHMARK_EVENTS_TOPIC", "events"),
        dlq_topic=_env("BATCHMARK_DLQ_TOPIC", "events.dlq"),
        partitions=int(_env("BATCHMARK_PARTITIONS", "2")),
    )
