"""Launching the Spark recompute with spark-submit, from the CLI and from the Airflow DAG alike."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from batchmark.config import REPO_ROOT, Settings
from batchmark.errors import BatchmarkError, ServiceUnavailable

RESULT_PREFIX = "BATCHMARK_RESULT "
JOB = REPO_ROOT / "batch" / "recompute.py"


def java_major() -> int | None:
    """The major version of the java on PATH (or JAVA_HOME), None when there is none."""
    java = Path(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    out = subprocess.run([str(java), "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def check_java() -> None:
    major = java_major()
    if major not in (17, 21):
        found = "no java" if major is None else f"java {major}"
        raise ServiceUnavailable(
            f"Spark needs Java 17 or 21 and found {found}. Install one, e.g. "
            "`apt-get install -y openjdk-17-jre-headless`, or set JAVA_HOME."
        )


def error_excerpt(output: str | None, limit: int = 40) -> str:
    """The part of a spark-submit's output that explains a failure: the Python traceback, else the error lines."""
    lines = (output or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            return "\n".join(lines[i : i + limit])
    errors = [ln for ln in lines if (" ERROR " in ln or "Exception" in ln or "Error" in ln) and " INFO " not in ln]
    return "\n".join((errors or lines)[-limit:])


def job_conf(settings: Settings, master: str) -> dict[str, str]:
    """The recompute's Spark configuration: batchmark's settings, and loopback-only listeners on local[*]."""
    conf = {
        "spark.sql.session.timeZone": "UTC",
        "spark.pyspark.driver.python": sys.executable,  # the driver is here; spark.pyspark.python: the executors'
        **settings.spark.spark_conf(),
    }
    if master.startswith("local"):  # keep every listener on loopback; a cluster driver must be reachable
        conf = {
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
            "spark.ui.enabled": "false",
            **conf,
        }
    return conf


def job_args(settings: Settings, day: date, run_id: str) -> list[str]:
    """The recompute's arguments for a day (the archive when the source keeps one: lost events become visible)."""
    args = ["--date", day.isoformat(), "--run-id", run_id]
    if settings.archive_file(day).exists():
        args += ["--archive", str(settings.archive_file(day))]
    return args


def command(settings: Settings, day: date, run_id: str, job: Path = JOB, extra: list[str] | None = None) -> list[str]:
    """The spark-submit command line of the recompute for one day, every setting from the configuration."""
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", settings.spark_master]
    for key, value in job_conf(settings, settings.spark_master).items():
        cmd += ["--conf", f"{key}={value}"]
    return [*cmd, str(job), *job_args(settings, day, run_id), *(extra or [])]


def environment(settings: Settings, master: str | None = None) -> dict[str, str]:
    """The environment spark-submit runs in: the job reads its settings from it, like every batchmark process."""
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "PYSPARK_PYTHON": settings.spark.python,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "BATCHMARK_LAKE": str(settings.lake),
        "DATABASE_URL": settings.database_url,
        "BATCHMARK_DEFINITIONS": str(settings.definitions_path),
    }
    if (master or settings.spark_master).startswith("local"):
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
    return env


def parse_result(day: date, returncode: int, output: str) -> dict[str, object]:
    """The job's BATCHMARK_RESULT line, or an error that quotes why it failed."""
    result = None
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if returncode != 0 or result is None:
        raise BatchmarkError(f"spark recompute for {day} failed (exit {returncode}):\n" + error_excerpt(output))
    return result


def submit(settings: Settings, day: date, run_id: str, timeout_s: float = 1800) -> dict[str, object]:
    """Run batch/recompute.py for one day with spark-submit; returns the job's result summary."""
    check_java()
    proc = subprocess.run(
        command(settings, day, run_id), env=environment(settings), capture_output=True, text=True, timeout=timeout_s
    )
    return parse_result(day, proc.returncode, f"{proc.stdout}\n{proc.stderr}")  # Spark 4: driver traceback on stdout


@contextlib.contextmanager
def standalone_cluster(
    log_dir: Path, master_port: int, webui_port: int, worker_cores: int = 2, worker_memory: str = "2g"
) -> Iterator[str]:
    """A Spark standalone master and one worker on 127.0.0.1, from the pyspark installation (separate JVMs;
    executors start their own Python workers). Yields the master URL (spark://127.0.0.1:PORT); stops both."""
    import pyspark

    from batchmark.broker import free_port

    check_java()
    spark_home = Path(pyspark.__file__).parent  # pip's pyspark is a whole Spark distribution
    spark_class = spark_home / "bin" / "spark-class"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_NO_DAEMONIZE": "1",
    }
    url = f"spark://127.0.0.1:{master_port}"
    master_cmd = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(master_port)]
    master_cmd += ["--webui-port", str(webui_port)]
    worker_cmd = ["org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--port", str(free_port())]
    worker_cmd += ["--webui-port", str(free_port()), "--cores", str(worker_cores), "--memory", worker_memory]
    procs: list[subprocess.Popen] = []
    try:
        for name, args in (("master", master_cmd), ("worker", worker_cmd)):
            with open(log_dir / f"spark-{name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(spark_class), *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + 90
        master_log = log_dir / "spark-master.log"
        while "Registering worker" not in master_log.read_text(errors="replace"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise ServiceUnavailable(
                    f"the Spark standalone cluster did not come up; see {log_dir}/spark-master.log and spark-worker.log"
                )
            time.sleep(0.5)
        yield url
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
