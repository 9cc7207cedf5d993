"""Static checks of the container stack in docker/ (no Docker engine needed).

What can be checked without running containers: the compose file's structure (ports on 127.0.0.1 only, one
image for every Python service, the application's and Airflow's environment, required secrets, health
conditions), the Dockerfile's steps, and -- where Debian's ``docker-compose`` binary is installed -- that
``docker-compose config`` accepts the file and refuses to render it while a required secret is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"

PYTHON_SERVICES = {
    "spark-master",
    "spark-worker",
    "faust-worker",
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
AIRFLOW_SERVICES = {s for s in PYTHON_SERVICES if s.startswith("airflow-")}
ALL_SERVICES = PYTHON_SERVICES | {"kafka", "postgres"}

# The names batchmark/config.py reads, with the values every Python service must get.
APP_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "DATABASE_URL": "postgresql://batchmark:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}@postgres:5432/batchmark",
    "BATCHMARK_LAKE": "/data/lake",
    "SPARK_MASTER": "spark://spark-master:7077",
    "BATCHMARK_PARTITIONS": "2",
}

REQUIRED_SECRETS = {
    "POSTGRES_PASSWORD",
    "AIRFLOW_DB_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_PASSWORDS_FILE",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _published(port) -> tuple[str, str]:
    """(host_ip, description) of one `ports:` entry, short or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), repr(port)
    text = str(port)
    host_ip = text.split(":", 1)[0] if text.count(":") >= 2 else ""
    return host_ip, text


def test_services(services: dict) -> None:
    assert set(services) == ALL_SERVICES


def test_every_published_port_is_on_loopback(services: dict) -> None:
    published = 0
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            host_ip, text = _published(port)
            assert host_ip == "127.0.0.1", f"{name}: port {text} is not bound to 127.0.0.1"
            published += 1
    assert published >= 4  # airflow UI, kafka host listener, postgres, spark UI


def test_python_services_share_one_build(services: dict) -> None:
    built = {name for name, svc in services.items() if "build" in svc}
    assert built == PYTHON_SERVICES
    builds = {repr(services[name]["build"]) for name in PYTHON_SERVICES}
    images = {services[name].get("image") for name in PYTHON_SERVICES}
    assert len(builds) == 1 and len(images) == 1, (builds, images)
    build = services["faust-worker"]["build"]
    assert build == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


@pytest.mark.parametrize("name", sorted(PYTHON_SERVICES))
def test_application_env(services: dict, name: str) -> None:
    env = _env(services[name])
    for key, value in APP_ENV.items():
        assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}"


@pytest.mark.parametrize("name", sorted(PYTHON_SERVICES))
def test_lake_volume_shared(services: dict, name: str) -> None:
    assert "lake:/data/lake" in services[name].get("volumes", [])


def test_commands(services: dict) -> None:
    cmd = {name: svc.get("command") for name, svc in services.items()}
    assert cmd["spark-master"] == ["spark-class", "org.apache.spark.deploy.master.Master", "--host", "spark-master"]
    assert cmd["spark-worker"] == ["spark-class", "org.apache.spark.deploy.worker.Worker", "spark://spark-master:7077"]
    assert cmd["faust-worker"] == ["faust", "-A", "streaming.app", "worker", "--without-web", "-l", "info"]
    assert cmd["airflow-init"] == ["batchmark", "init-airflow"]  # migrate + the Spark connection the DAG uses
    assert cmd["airflow-api-server"] == ["airflow", "api-server"]
    assert cmd["airflow-scheduler"] == ["airflow", "scheduler", "--skip-serve-logs"]
    assert cmd["airflow-dag-processor"] == ["airflow", "dag-processor"]
    assert cmd["airflow-triggerer"] == ["airflow", "triggerer", "--skip-serve-logs"]


def test_kafka_kraft_listeners(services: dict) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "INTERNAL://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "HOST://127.0.0.1:" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["CLUSTER_ID"]


def test_postgres_databases_and_init_script(services: dict) -> None:
    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    env = _env(pg)
    assert env["POSTGRES_DB"] == "batchmark" and env["POSTGRES_USER"] == "batchmark"
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    script = DOCKER / "postgres-init" / "10-create-airflow-db.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert "CREATE DATABASE airflow" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)


def _airflow_config_options() -> set[str] | None:
    spec = importlib.util.find_spec("airflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    config_yml = Path(next(iter(spec.submodule_search_locations))) / "config_templates" / "config.yml"
    if not config_yml.exists():
        return None
    sections = yaml.safe_load(config_yml.read_text())
    return {f"AIRFLOW__{s.upper()}__{o.upper()}" for s, body in sections.items() for o in body.get("options", {})}


@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_airflow_env(services: dict, name: str) -> None:
    env = _env(services[name])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/app/dags"
    assert env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"].lower() == "false"
    roles = dict(u.split(":") for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(","))
    assert roles == {"admin": "admin", "viewer": "viewer"}
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for shared in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET"):
        assert env[shared].startswith("${") and ":?" in env[shared], shared


def test_airflow_env_names_exist_in_installed_airflow(services: dict) -> None:
    options = _airflow_config_options()
    assert options is not None, "apache-airflow is not installed in this interpreter"
    names = {k for s in AIRFLOW_SERVICES for k in _env(services[s]) if k.startswith("AIRFLOW__")}
    unknown = sorted(names - options)
    assert not unknown, f"not options of the installed Airflow: {unknown}"


def test_passwords_file_mounted_from_outside(services: dict) -> None:
    api = services["airflow-api-server"]
    target = _env(api)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    mounts = [v for v in api["volumes"] if isinstance(v, str) and v.endswith(":" + target)]
    assert mounts == [f"${{AIRFLOW_PASSWORDS_FILE:?set AIRFLOW_PASSWORDS_FILE}}:{target}"]
    # Airflow opens the file read-write ("a+"/"r+"): a read-only mount would crash the API server.
    assert not mounts[0].endswith(":ro")


def test_health_conditions(services: dict) -> None:
    for name in ("postgres", "kafka", "spark-master", "airflow-api-server"):
        assert "healthcheck" in services[name], name
    faust_deps = services["faust-worker"]["depends_on"]
    assert faust_deps["kafka"]["condition"] == "service_healthy"
    assert faust_deps["postgres"]["condition"] == "service_healthy"
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["airflow-init"]["restart"] == "no"
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        deps = services[name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
    assert services["spark-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"


def test_secrets_are_required_variables_not_values() -> None:
    text = COMPOSE_FILE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == REQUIRED_SECRETS
    example = (DOCKER / ".env.example").read_text()
    declared = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#") and "=" in line
    )
    referenced = set(re.findall(r"\$\{(\w+)", text))
    assert referenced <= set(declared), sorted(referenced - set(declared))
    for name in REQUIRED_SECRETS:
        assert declared[name] == "", f".env.example must not carry a value for {name}"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M)
    assert "openjdk-17-jre-headless" in text
    assert "pip install --no-cache-dir uv==0.13.8" in text
    assert "COPY pyproject.toml uv.lock ./" in text
    assert re.search(r"^RUN uv sync --frozen --no-dev$", text, re.M)
    assert 'PATH="/app/.venv/bin:${PATH}"' in text
    assert "PYSPARK_PYTHON=/app/.venv/bin/python" in text
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_lock_has_airflow_async_postgres_driver() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    assert "asyncpg" in {p["name"] for p in lock["package"]}


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:  # `./bm test` installs it; a missing binary is a broken setup, not a reason to skip
        pytest.fail("docker-compose is missing: run the tests with `./bm test` (or apt-get install docker-compose)")
    return binary


def _run_config(binary: str, env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", "-q"],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    binary = _docker_compose()
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}=/tmp/x.json" if name == "AIRFLOW_PASSWORDS_FILE" else line)
        if name in REQUIRED_SECRETS - {"AIRFLOW_PASSWORDS_FILE"}:
            lines[-1] = f"{name}=dummy0123456789"
    env_file = tmp_path / "env"
    env_file.write_text("\n".join(lines) + "\n")
    result = _run_config(binary, env_file)
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_refuses_missing_secrets(tmp_path: Path) -> None:
    binary = _docker_compose()
    env_file = tmp_path / "env"
    env_file.write_text("")
    result = _run_config(binary, env_file)
    assert result.returncode != 0
    assert "set " in result.stderr


def test_every_airflow_service_shares_the_reports_volume(services: dict) -> None:
    """Tasks write the Data Docs in the scheduler's container; the API server serves them to alert links."""
    for name in AIRFLOW_SERVICES:
        assert "gx:/opt/batchmark/gx" in services[name].get("volumes", []), name
        env = _env(services[name])
        assert "BATCHMARK_ALERT_CHANNELS" in env and env["BATCHMARK_REPORT_URL"].endswith("/batchmark/reports}")
