"""The environment Airflow runs with locally (demo, tests): metadata DB, DAGs folder, loopback, auth on."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from batchmark.config import REPO_ROOT, Settings

AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
# The only Airflow users (simple auth manager, user:role) and where each one's password may come from.
USERS = {"admin": "admin", "viewer": "viewer"}
PASSWORD_ENV = {"admin": "BATCHMARK_AIRFLOW_ADMIN_PASSWORD", "viewer": "BATCHMARK_AIRFLOW_VIEWER_PASSWORD"}


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
        "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        # Runtime state, never in git (.batchmark/ is ignored); point the variable elsewhere to move it.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "simple_auth_manager_passwords.json.generated"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
    env = {**defaults, **{k: v for k, v in os.environ.items() if k.startswith("AIRFLOW")}}
    env.update(extra or {})
    return env


def stack_metadata_db(settings: Settings) -> str:
    """The metadata DB of `batchmark up`'s Airflow: a Postgres database beside the product's, `<db>_airflow`
    (a libpq URL). Its scheduler, API server, DAG processor and triggerer write at once; SQLite refuses a writer
    that comes while another holds the lock ("database is locked", e.g. a backfill request), Postgres does not."""
    base, _, name = settings.database_url.rpartition("/")
    return f"{base}/{name.split('?')[0]}_airflow"


def stack_metadata_url(settings: Settings) -> str:
    """stack_metadata_db in the form SQLAlchemy (Airflow) wants."""
    return dataclasses.replace(settings, database_url=stack_metadata_db(settings)).sqlalchemy_url


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def migrate(settings: Settings, extra: dict[str, str] | None = None) -> None:
    """Create or upgrade Airflow's metadata database (idempotent, a few seconds); `extra` as for airflow_env."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **airflow_env(settings, extra)}
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True, text=True)
    ensure_spark_connection(settings, env)


SPARK_CONN_ID = "batchmark_spark"


def ensure_spark_connection(settings: Settings, env: dict[str, str]) -> None:
    """Create the Spark connection the recompute submits through (master: SPARK_MASTER) unless it exists: it
    lives in the metadata DB, so a change in the UI (Admin -> Connections) sticks and points the DAG elsewhere."""
    what = "Where batchmark's nightly recompute runs (spark-submit --master <host>)"
    cmd = [airflow_bin(), "connections", "add", SPARK_CONN_ID, "--conn-type", "spark"]
    cmd += ["--conn-host", settings.spark_master, "--conn-description", what]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "already exists" not in proc.stdout + proc.stderr:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)


def ensure_auth(settings: Settings) -> dict[str, str]:
    """Make sure every configured Airflow user has a password in the simple auth manager's file; return them.

    A user's password is BATCHMARK_AIRFLOW_<USER>_PASSWORD when set (it replaces the file's), else the one in
    the file, else a random one generated here once. The file is written with mode 0600. Only the API server
    needs it; ``airflow dags test`` and ``dag.test()`` run without.
    """
    env = airflow_env(settings)
    path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    users = [u.split(":")[0] for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",") if u.strip()]
    current: dict[str, str] = {}
    if path.exists():
        text = path.read_text().strip()
        current = json.loads(text) if text else {}
    wanted = dict(current)
    for user in users:
        from_env = os.environ.get(PASSWORD_ENV.get(user, f"BATCHMARK_AIRFLOW_{user.upper()}_PASSWORD"), "")
        wanted[user] = from_env or current.get(user) or secrets.token_urlsafe(18)
    if wanted != current or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(wanted) + "\n")
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return {user: wanted[user] for user in users}
