"""Access and security: Airflow refuses unauthenticated and unauthorized requests, each Postgres writer's role
can change only its own results, no secret is committed, and every server listens on loopback by default.

Real services: an `airflow api-server` on a free loopback port over the session's migrated metadata DB, and the
test Postgres database. The server trusts every local login, so the roles are judged by their GRANTs only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

from batchmark import access, config, storage
from batchmark.airflow_env import airflow_bin, airflow_env, ensure_auth
from batchmark.broker import free_port
from batchmark.config import REPO_ROOT
from batchmark.engine import WindowResult

DAG_ID = "nightly_recompute"
START_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------- Airflow


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and every worker it forked (its own process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def api(airflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Airflow API server with the project's auth settings, on 127.0.0.1:<free port>."""
    settings = config.load()
    passwords = ensure_auth(settings)
    port = free_port()
    env = {
        **os.environ,
        **airflow_env(
            settings,
            {
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            },
        ),
    }
    logs = tmp_path_factory.mktemp("airflow-api")
    # The DAG must be in the metadata DB (serialized) for the REST API to know it and its params.
    t0 = time.monotonic()
    subprocess.run(
        [airflow_bin(), "dags", "reserialize"], env=env, check=True, capture_output=True, text=True, timeout=180
    )
    reserialize_s = time.monotonic() - t0

    log = open(logs / "api-server.log", "wb")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [airflow_bin(), "api-server", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5.0) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"airflow api-server exited with {proc.returncode}; see {logs / 'api-server.log'}")
                try:
                    if client.get("/api/v2/monitor/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"airflow api-server not healthy after {START_TIMEOUT_S:.0f} s; see {logs}")
                time.sleep(0.5)
            started_s = time.monotonic() - t0
            print(f"\napi-server healthy in {started_s:.1f} s (dags reserialize {reserialize_s:.1f} s)")
            yield {"client": client, "passwords": passwords, "port": port, "started_s": started_s}
    finally:
        _stop(proc)
        log.close()


def _token(client: httpx.Client, username: str, password: str) -> httpx.Response:
    return client.post("/auth/token", json={"username": username, "password": password})


def _bearer(client: httpx.Client, username: str, password: str) -> dict[str, str]:
    r = _token(client, username, password)
    assert r.status_code in (200, 201), r.text
    token = r.json()["access_token"]
    assert isinstance(token, str) and len(token) > 20
    return {"Authorization": f"Bearer {token}"}


def test_airflow_env_turns_auth_on() -> None:
    env = airflow_env(config.load())
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    users = dict(u.split(":") for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    assert users == {"admin": "admin", "viewer": "viewer"}
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"


def test_passwords_file_is_private_and_untracked(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = config.load()
    first = ensure_auth(settings)
    path = Path(airflow_env(settings)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert set(first) == {"admin", "viewer"}
    assert all(len(p) >= 20 for p in first.values())
    assert first["admin"] != first["viewer"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == first
    assert ensure_auth(settings) == first  # generated once, then kept
    if path.resolve().is_relative_to(REPO_ROOT):  # inside the working tree (the default .batchmark/): ignored
        rel = str(path.resolve().relative_to(REPO_ROOT))
        assert subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO_ROOT).returncode == 0
        tracked = subprocess.run(["git", "ls-files", "--", rel], cwd=REPO_ROOT, capture_output=True, text=True)
        assert tracked.returncode == 0 and tracked.stdout.strip() == ""
    # A password from the environment wins over the file's, and lands in the file Airflow reads.
    saved = path.read_bytes()
    try:
        monkeypatch.setenv("BATCHMARK_AIRFLOW_VIEWER_PASSWORD", "viewer-from-env-" + secrets.token_hex(4))
        second = ensure_auth(settings)
        assert second["viewer"] == os.environ["BATCHMARK_AIRFLOW_VIEWER_PASSWORD"]
        assert second["admin"] == first["admin"]
        assert json.loads(path.read_text())["viewer"] == second["viewer"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        monkeypatch.delenv("BATCHMARK_AIRFLOW_VIEWER_PASSWORD")
        path.write_bytes(saved)  # the other tests (and a running API server) keep the generated ones
    assert ensure_auth(settings) == first
    # The default location, when not overridden, is the local Airflow home under the git-ignored .batchmark/.
    monkeypatch.delenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", raising=False)
    default = Path(airflow_env(settings)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert default == settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", ".batchmark/airflow/simple_auth_manager_passwords.json.generated"],
        cwd=REPO_ROOT,
    )
    assert ignored.returncode == 0


def test_unauthenticated_request_refused(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    r = client.get("/api/v2/dags")
    assert r.status_code in (401, 403), r.text
    r = client.get("/api/v2/dags", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code in (401, 403), r.text
    r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {}})
    assert r.status_code in (401, 403), r.text


def test_wrong_password_refused(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    r = _token(client, "admin", api["passwords"]["admin"] + "x")
    assert r.status_code in (401, 403), r.text
    assert "access_token" not in r.text
    r = _token(client, "nobody", api["passwords"]["admin"])
    assert r.status_code in (401, 403), r.text


def test_admin_token_lists_dags(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    r = client.get("/api/v2/dags", headers=_bearer(client, "admin", api["passwords"]["admin"]))
    assert r.status_code == 200, r.text
    assert DAG_ID in [d["dag_id"] for d in r.json()["dags"]]


def test_viewer_reads_but_cannot_change(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    viewer = _bearer(client, "viewer", api["passwords"]["viewer"])
    assert client.get(f"/api/v2/dags/{DAG_ID}", headers=viewer).status_code == 200
    r = client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}, headers=viewer)
    assert r.status_code == 403, r.text
    r = client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {}}, headers=viewer)
    assert r.status_code == 403, r.text
    admin = _bearer(client, "admin", api["passwords"]["admin"])
    assert client.get(f"/api/v2/dags/{DAG_ID}", headers=admin).json()["is_paused"] is True  # unchanged


def test_malformed_date_refused_by_param(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    admin = _bearer(client, "admin", api["passwords"]["admin"])
    runs = f"/api/v2/dags/{DAG_ID}/dagRuns"
    before = client.get(runs, headers=admin).json()["total_entries"]  # other tests may have run the DAG
    for bad in ("2026-11-24'; DROP TABLE x; --", "24/11/2026", "2026-11-2", "x2026-11-24", 20261124, ["2026-11-24"]):
        r = client.post(runs, json={"conf": {"date": bad}, "logical_date": None}, headers=admin)
        assert r.status_code == 400, (bad, r.status_code, r.text)
    assert client.get(runs, headers=admin).json()["total_entries"] == before  # no run was created
    # The same request with a well-formed date is accepted (the refusal was the pattern's); then removed again.
    r = client.post(runs, json={"conf": {"date": "2026-11-24"}, "logical_date": None}, headers=admin)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert r.json()["conf"] == {"date": "2026-11-24"}
    assert client.delete(f"{runs}/{run_id}", headers=admin).status_code == 204
    assert client.get(runs, headers=admin).json()["total_entries"] == before


def test_date_with_trailing_newline_refused(api: dict[str, Any]) -> None:
    client: httpx.Client = api["client"]
    admin = _bearer(client, "admin", api["passwords"]["admin"])
    runs = f"/api/v2/dags/{DAG_ID}/dagRuns"
    r = client.post(runs, json={"conf": {"date": "2026-11-24\n"}, "logical_date": None}, headers=admin)
    if r.status_code == 200:  # leave no run behind for the other tests
        client.delete(f"{runs}/{r.json()['dag_run_id']}", headers=admin)
    assert r.status_code == 400, r.text


# -------------------------------------------------------------------------------------------------- Postgres

DAY = date(2001, 2, 3)  # a day no other test writes
METRIC = "access_test_metric"
T0 = int(datetime(2001, 2, 3, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def roles(pg_url: str) -> Iterator[dict[str, str]]:
    urls = access.create_roles(pg_url)
    assert access.create_roles(pg_url) == urls  # idempotent
    yield urls
    with storage.transaction(pg_url) as cur:
        for schema, table in (("stream", "results"), ("truth", "results"), ("quality", "window_accuracy")):
            cur.execute(sql.SQL("DELETE FROM {} WHERE metric = %s").format(sql.Identifier(schema, table)), (METRIC,))
        cur.execute("DELETE FROM quality.accuracy_history WHERE metric = %s", (METRIC,))
        cur.execute("DELETE FROM quality.metrics WHERE metric = %s", (METRIC,))
        cur.execute("DELETE FROM quality.task_failures WHERE dag_id = %s", ("access_test",))


def _ok(url: str, statement: str, params: tuple[Any, ...] = ()) -> int:
    with storage.transaction(url) as cur:
        cur.execute(statement, params)
        return cur.rowcount


def _denied(url: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(statement, params)
    finally:
        conn.rollback()
        conn.close()


def _whoami(url: str) -> str:
    with storage.transaction(url) as cur:
        cur.execute("SELECT current_user")
        return cur.fetchone()[0]


STREAM_ROW = (
    "INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events) "
    "VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s)"
)
TRUTH_ROW = (
    "INSERT INTO truth.results (metric, group_key, window_start, window_end, day, value, n_events, run_id) "
    "VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, 'access')"
)
ACCURACY_ROW = (
    "INSERT INTO quality.window_accuracy (metric, group_key, window_start, day, n_lost, n_dup, n_late) "
    "VALUES (%s, %s, to_timestamp(%s), %s, 0, 0, 0)"
)


def _row(group: str) -> tuple[Any, ...]:
    return (METRIC, group, T0 / 1000 + 7200, T0 / 1000 + 7260, DAY, 1.0, 1)


def test_roles_are_plain_logins(roles: dict[str, str], pg_url: str) -> None:
    assert set(roles) == {"batchmark_stream", "batchmark_batch", "batchmark_quality"}
    for role, url in roles.items():
        assert "@" in url and url.split("://", 1)[1].split("@")[0] == role  # user = role, no password
        assert _whoami(url) == role
    with storage.transaction(pg_url) as cur:
        cur.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
            (list(roles),),
        )
        rows = cur.fetchall()
        assert [r[0] for r in rows] == sorted(roles)
        assert all(r[1:] == (True, False, False, False, False, False) for r in rows)
        cur.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE rolname = ANY(%s)",
            (list(roles),),
        )
        assert cur.fetchone()[0] == 0  # no role owns anything


def test_stream_role(roles: dict[str, str]) -> None:
    url = roles["batchmark_stream"]
    assert _ok(url, STREAM_ROW, _row("s1")) == 1
    assert _ok(url, "UPDATE stream.results SET value = 2 WHERE metric = %s AND group_key = 's1'", (METRIC,)) == 1
    assert _ok(url, "DELETE FROM stream.results WHERE metric = %s AND group_key = 's1'", (METRIC,)) == 1
    # The real writers of the stream worker.
    with storage.transaction(url) as cur:
        n = storage.upsert_stream_results(
            cur,
            [WindowResult(METRIC, "s2", T0, T0 + 60_000, 3.0, 3), WindowResult(METRIC, "s3", T0, T0 + 60_000, 4.0, 4)],
        )
        storage.add_late_events(cur, 0, "epoch0", [(METRIC, T0, 2)])
        storage.write_checkpoint(cur, "access-test-topic", 0, 5, 9, T0, "e1")
    assert n == 2
    assert storage.read_checkpoint(url, "access-test-topic", 0) == (5, 9, T0, "e1")
    assert _ok(url, "DELETE FROM stream.checkpoints WHERE topic = 'access-test-topic'") == 1
    assert _ok(url, "DELETE FROM stream.late_events WHERE metric = %s", (METRIC,)) == 1
    # Nothing of the batch truth or the quality history.
    _denied(url, "UPDATE truth.results SET value = 0 WHERE metric = %s", (METRIC,))
    _denied(url, TRUTH_ROW, _row("x"))
    _denied(url, "DELETE FROM truth.results")
    _denied(url, "SELECT count(*) FROM truth.results")
    _denied(url, ACCURACY_ROW, (METRIC, "x", T0 / 1000, DAY))
    _denied(url, "UPDATE quality.metrics SET tolerance = 1")
    _denied(
        url,
        "INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing, "
        "over_tolerance, tolerance) VALUES ('r', %s, %s, true, 0, 0, 0, 0)",
        (DAY, METRIC),
    )
    _denied(url, "CREATE TABLE stream.extra (x int)")
    _denied(url, "DROP TABLE stream.results")


def test_least_privilege_roles_can_start_their_processes(roles: dict[str, str]) -> None:
    """The worker and the validation call init_schema at start; under their own roles that must still work."""
    for role in ("batchmark_stream", "batchmark_batch", "batchmark_quality"):
        storage.init_schema(roles[role])  # no DDL rights: goes on because the schema is in place
        assert _whoami(roles[role]) == role


def test_batch_role(roles: dict[str, str], pg_url: str) -> None:
    url = roles["batchmark_batch"]
    stream_url = roles["batchmark_stream"]
    with storage.transaction(stream_url) as cur:
        storage.upsert_stream_results(cur, [WindowResult(METRIC, "b1", T0, T0 + 60_000, 5.0, 5)])
    # The real writer of the Spark job: a day of truth and its per-window accuracy, replaced in one transaction.
    truth = [(METRIC, "b1", T0, T0 + 60_000, 5.0, 5, None), (METRIC, "b2", T0, T0 + 60_000, 6.0, 6, {"k": 1})]
    accuracy = [(METRIC, "b1", T0, 5.0, 0.0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, None)]
    assert storage.replace_truth_day(url, DAY, [METRIC], truth, "run-1", accuracy) == 2
    assert storage.replace_truth_day(url, DAY, [METRIC], truth[:1], "run-2", accuracy) == 1
    assert storage.fetch_results(url, "truth", DAY) == {
        (METRIC, "b1", datetime.fromtimestamp(T0 / 1000, UTC)): (5.0, 5)
    }
    assert _ok(url, "UPDATE truth.results SET value = 5 WHERE metric = %s", (METRIC,)) == 1
    assert _ok(url, "UPDATE quality.window_accuracy SET error = 0 WHERE metric = %s", (METRIC,)) == 1
    # Reads the stream's values (the comparison), cannot change them.
    assert storage.fetch_results(url, "stream", DAY)[(METRIC, "b1", datetime.fromtimestamp(T0 / 1000, UTC))] == (5.0, 5)
    _denied(url, "UPDATE stream.results SET value = 0 WHERE metric = %s", (METRIC,))
    _denied(url, "DELETE FROM stream.results WHERE metric = %s", (METRIC,))
    _denied(url, STREAM_ROW, _row("x"))
    _denied(url, "UPDATE stream.checkpoints SET next_offset = 0")
    _denied(url, "DELETE FROM stream.late_events")
    _denied(url, "INSERT INTO quality.metrics (metric, kind, tolerance) VALUES (%s, 'count', 1)", (METRIC,))
    _denied(url, "DELETE FROM quality.accuracy_history")
    _denied(url, "CREATE TABLE truth.extra (x int)")
    with storage.transaction(pg_url) as cur:  # what the batch role did is really there
        cur.execute("SELECT value, run_id FROM truth.results WHERE metric = %s", (METRIC,))
        assert cur.fetchall() == [(5.0, "run-2")]


def test_quality_role(roles: dict[str, str], pg_url: str) -> None:
    url = roles["batchmark_quality"]
    assert (
        _ok(
            url,
            "INSERT INTO quality.metrics (metric, kind, tolerance) VALUES (%s, 'count', 0) "
            "ON CONFLICT (metric) DO UPDATE SET tolerance = EXCLUDED.tolerance",
            (METRIC,),
        )
        == 1
    )
    with storage.transaction(url) as cur:
        cur.execute("SELECT count(*) FROM quality.comparison WHERE day = %s AND metric = %s", (DAY, METRIC))
        assert cur.fetchone()[0] >= 0
    assert (
        _ok(
            url,
            "INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing, "
            "over_tolerance, tolerance) VALUES ('r', %s, %s, true, 0, 0, 0, 0)",
            (DAY, METRIC),
        )
        == 1
    )
    storage.record_task_failure(url, "access_test", "t", "r", str(DAY), "boom")
    # init_schema (run by the owner) drops and re-creates the views: the quality role keeps reading them.
    storage.init_schema(pg_url)
    with storage.transaction(url) as cur:
        cur.execute("SELECT count(*) FROM quality.comparison WHERE metric = %s", (METRIC,))
        assert cur.fetchone()[0] >= 0
        cur.execute("SELECT count(*) FROM serving.results WHERE metric = %s", (METRIC,))
        assert cur.fetchone()[0] >= 0
    for statement, params in [
        (STREAM_ROW, _row("q")),
        ("UPDATE stream.results SET value = 0 WHERE metric = %s", (METRIC,)),
        ("DELETE FROM stream.checkpoints", ()),
        (TRUTH_ROW, _row("q")),
        ("UPDATE truth.results SET value = 0 WHERE metric = %s", (METRIC,)),
        ("DELETE FROM truth.results", ()),
        (ACCURACY_ROW, (METRIC, "q", T0 / 1000, DAY)),
        ("UPDATE quality.window_accuracy SET error = 0", ()),
        ("CREATE TABLE quality.extra (x int)", ()),
    ]:
        _denied(url, statement, params)


def test_role_password_from_environment(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password given in the environment is set (SCRAM-hashed) and never appears in the returned URL."""
    password = "pw-" + secrets.token_urlsafe(12)
    monkeypatch.setenv("BATCHMARK_QUALITY_PASSWORD", password)
    try:
        urls = access.create_roles(pg_url)
        assert password not in json.dumps(urls)
        with storage.transaction(pg_url) as cur:
            cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'batchmark_quality'")
            stored = cur.fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$") and password not in stored
        with_pw = access.role_url(pg_url, "batchmark_quality", "BATCHMARK_QUALITY_PASSWORD")
        assert with_pw.split("://", 1)[1].startswith(f"batchmark_quality:{password}@")
        assert _whoami(with_pw) == "batchmark_quality"
    finally:
        with storage.transaction(pg_url) as cur:
            cur.execute("ALTER ROLE batchmark_quality PASSWORD NULL")


# ----------------------------------------------------------------------------------------- secrets, loopback

CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s'\"]+)@", re.I)


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [REPO_ROOT / p for p in out.decode().split("\0") if p]


def test_no_credential_in_tracked_files() -> None:
    offenders = []
    for path in _tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for m in CREDENTIAL_URL.finditer(text):
            if not m.group(1).startswith("$"):  # ${VAR} / $VAR substitutions are fine
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {m.group(0)}")
    assert offenders == []


def test_gx_connection_from_environment() -> None:
    text = (REPO_ROOT / "expectations" / "great_expectations.yml").read_text()
    assert CREDENTIAL_URL.search(text) is None
    assert "postgresql" not in text.split("connection_string:", 1)[1].splitlines()[0]
    strings = re.findall(r"^\s*connection_string:\s*(\S+)\s*$", text, re.M)
    assert strings and all(re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*\}", s) for s in strings), strings
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "expectations/uncommitted/config_variables.yml"], cwd=REPO_ROOT
    )
    assert ignored.returncode == 0  # GX's own variables file is never committed


def test_env_example_has_no_secret_values() -> None:
    values = {}
    for line in (REPO_ROOT / "docker" / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    secret_keys = [k for k in values if re.search(r"PASSWORD|SECRET|FERNET|TOKEN|KEY", k)]
    assert {"POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY"} <= set(secret_keys)
    assert {k: values[k] for k in secret_keys} == {k: "" for k in secret_keys}
    tracked = subprocess.run(["git", "ls-files", "docker/.env"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


def test_settings_default_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults point at loopback. What the running processes really listen on is read from their sockets
    in tests/integration/test_stack.py (every process `batchmark up` starts) and test_processes.py."""
    for var in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = config.load()
    assert settings.bootstrap_servers.split(":")[0] == "127.0.0.1"
    assert settings.database_url.split("@", 1)[1].startswith("127.0.0.1:")
    assert airflow_env(settings)["AIRFLOW__API__HOST"] == "127.0.0.1"


SQL_BUILT_FROM_TEXT = re.compile(
    r"""\.execute(?:many)?\(\s*(?:f["']|["'][^"']*["']\s*(?:%|\.format\())|"""
    r"""\bsql\.SQL\(\s*f["']""",
)


def test_sql_is_built_with_parameters_only() -> None:
    """No statement is an f-string, %-formatted or str.format-ed: values are parameters, names sql.Identifier."""
    offenders = []
    for path in _tracked_files() + sorted((REPO_ROOT / "batchmark").glob("*.py")) + [Path(__file__)]:
        if path.suffix != ".py" or not path.is_file() or ".venv" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if SQL_BUILT_FROM_TEXT.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert offenders == []
    call = "cur." + "execute("  # split, so this file passes its own check
    assert SQL_BUILT_FROM_TEXT.search(call + 'f"DELETE FROM {t}")')  # the check itself sees one
    assert SQL_BUILT_FROM_TEXT.search(call + "'SELECT %s' % x)")
    assert SQL_BUILT_FROM_TEXT.search(call + '"DELETE FROM {}".format(t))')
    assert not SQL_BUILT_FROM_TEXT.search(call + '"SELECT 1 WHERE x = %s", (x,))')
