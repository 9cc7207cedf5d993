"""Configuration in one place: every setting is an environment variable with a default for local runs."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from batchmark.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class SparkSettings:
    """How the recompute runs on Spark; the master is Settings.spark_master (SPARK_MASTER).

    shuffle_partitions  BATCHMARK_SPARK_SHUFFLE_PARTITIONS  also the shards of group keys per bucket (default 8)
    driver_memory       BATCHMARK_SPARK_DRIVER_MEMORY       e.g. 2g; empty: Spark's default (1g)
    executor_memory     BATCHMARK_SPARK_EXECUTOR_MEMORY     per executor on a cluster; empty: Spark's default
    executor_cores      BATCHMARK_SPARK_EXECUTOR_CORES      per executor on a cluster; empty: Spark's default
    python              BATCHMARK_SPARK_PYTHON              the executors' Python (a cluster's is not ours);
                                                            default: this process's interpreter
    conf                BATCHMARK_SPARK_CONF                any other Spark settings: "key=value key=value"
    """

    shuffle_partitions: int = 8
    driver_memory: str = ""
    executor_memory: str = ""
    executor_cores: str = ""
    python: str = field(default_factory=lambda: sys.executable)
    conf: dict[str, str] = field(default_factory=dict)

    def spark_conf(self) -> dict[str, str]:
        """Every setting as Spark configuration keys (conf last: it overrides the named ones)."""
        out = {"spark.sql.shuffle.partitions": str(self.shuffle_partitions), "spark.pyspark.python": self.python}
        named = {
            "spark.driver.memory": self.driver_memory,
            "spark.executor.memory": self.executor_memory,
            "spark.executor.cores": self.executor_cores,
        }
        out.update({k: v for k, v in named.items() if v})
        out.update(self.conf)
        return out


def parse_spark_conf(text: str) -> dict[str, str]:
    """'k=v k2=v2' (spaces or commas between pairs) -> {k: v}; a pair without '=' is refused with a fix."""
    out = {}
    for pair in text.replace(",", " ").split():
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("spark."):
            raise ConfigError(
                f"BATCHMARK_SPARK_CONF: {pair!r} is not spark.<key>=<value>; "
                "write e.g. BATCHMARK_SPARK_CONF='spark.executor.instances=2 spark.memory.fraction=0.7'"
            )
        out[key] = value
    return out


def _spark_settings() -> SparkSettings:
    partitions = _env("BATCHMARK_SPARK_SHUFFLE_PARTITIONS", "8")
    if not partitions.isdigit() or int(partitions) < 1:
        raise ConfigError(f"BATCHMARK_SPARK_SHUFFLE_PARTITIONS must be a whole number >= 1, got {partitions!r}")
    return SparkSettings(
        shuffle_partitions=int(partitions),
        driver_memory=_env("BATCHMARK_SPARK_DRIVER_MEMORY", ""),
        executor_memory=_env("BATCHMARK_SPARK_EXECUTOR_MEMORY", ""),
        executor_cores=_env("BATCHMARK_SPARK_EXECUTOR_CORES", ""),
        python=_env("BATCHMARK_SPARK_PYTHON", sys.executable),
        conf=parse_spark_conf(_env("BATCHMARK_SPARK_CONF", "")),
    )


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
    spark: SparkSettings = field(default_factory=lambda: SparkSettings())
    # Where alerts go: Airflow connection ids (apprise or smtp type), comma-separated in BATCHMARK_ALERT_CHANNELS;
    # none = alerts are recorded in quality.alerts and shown, not sent.
    alert_channels: tuple[str, ...] = ()
    # The HTTP address of the validation reports (the Data Docs the Airflow plugin serves); alert links start here.
    report_url: str = "http://127.0.0.1:8080/batchmark/reports"
    alert_retry_seconds: float = 60.0  # the first retry of a failed delivery; doubles per attempt, at most 6 h
    decision_days: int = 14  # the Accuracy view's "is the stream alone enough?" looks at this many days
    live_interval_s: float = 2.0  # how often the worker refreshes stream.open_windows; 0 = no live rows
    version: str = "stable"  # the [[version]] of the streaming app a worker runs (the Kappa comparison sets it)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL in the form SQLAlchemy (GX, Airflow) wants."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg2://" + url[len(prefix) :]
        return url

    def gx_project(self, dataset: str) -> Path:
        """The GX project of a dataset in this database: generated under gx_root (the runtime home), from the
        repository's hand-written template (expectations/great_expectations.yml), never in the repository."""
        db = urlsplit(self.database_url).path.lstrip("/") or "postgres"
        return self.gx_root / f"{dataset}-{db}"

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
    events_topic = _env("BATCHMARK_EVENTS_TOPIC", "events")
    return Settings(
        home=home,
        bootstrap_servers=_env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        database_url=_env("DATABASE_URL", default_database_url(home)),
        lake=Path(_env("BATCHMARK_LAKE", str(home / "lake"))).resolve(),
        spark_master=_env("SPARK_MASTER", "local[*]"),
        airflow_home=Path(_env("AIRFLOW_HOME", str(home / "airflow"))).resolve(),
        definitions_path=Path(_env("BATCHMARK_DEFINITIONS", str(REPO_ROOT / "batchmark" / "metrics.toml"))),
        gx_root=Path(_env("BATCHMARK_GX_ROOT", str(home / "gx"))).resolve(),
        archive=Path(_env("BATCHMARK_ARCHIVE", str(home / "archive"))).resolve(),
        events_topic=events_topic,
        dlq_topic=_env("BATCHMARK_DLQ_TOPIC", f"{events_topic}.dlq"),  # each events topic has its own
        partitions=int(_env("BATCHMARK_PARTITIONS", "2")),
        spark=_spark_settings(),
        alert_channels=tuple(c.strip() for c in _env("BATCHMARK_ALERT_CHANNELS", "").split(",") if c.strip()),
        report_url=_env("BATCHMARK_REPORT_URL", "http://127.0.0.1:8080/batchmark/reports").rstrip("/"),
        alert_retry_seconds=float(_env("BATCHMARK_ALERT_RETRY_SECONDS", "60")),
        decision_days=int(_env("BATCHMARK_DECISION_DAYS", "14")),
        live_interval_s=float(_env("BATCHMARK_LIVE_INTERVAL_S", "2")),
        version=_env("BATCHMARK_VERSION", "stable"),
    )
