"""The environment Airflow runs with locally (demo, tests): metadata DB, DAGs folder, loopback, auth on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from batchmark.config import REPO_ROOT, Settings


def airflow_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for an Airflow process (explicit AIRFLOW__* settings in the environment win)."""
    home = settings.airflow_home
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
    env = {**defaults, **{k: v for k, v in os.environ.items() if k.startswith("AIRFLOW")}}
    env.update(extra or {})
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def migrate(settings: Settings) -> None:
    """Create or upgrade Airflow's metadata database (idempotent, a few seconds)."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **airflow_env(settings)}
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True, text=True)
