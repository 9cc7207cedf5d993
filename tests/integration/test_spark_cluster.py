"""The recompute on a real Spark standalone cluster (master and worker in their own JVMs on 127.0.0.1, executors
with their own Python workers) gives the same rows as local[*], with every setting from the configuration, and
the nightly DAG goes there when its Airflow connection `batchmark_spark` says so."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from batchmark import config, spark, storage
from batchmark.airflow_env import airflow_bin, ensure_spark_connection
from batchmark.broker import free_port
from batchmark.generator import GeneratorConfig, write_lake_day
from batchmark.lake import write_watermark
from batchmark.windows import day_bounds_ms

DAY = date(2026, 8, 30)
pytestmark = pytest.mark.timeout(900)


def _rows(url: str) -> tuple[dict, list]:
    truth = storage.fetch_results(url, "truth", DAY)
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, window_start, stream_value, error, n_lost, n_dup, n_late, lost_effect, "
            "dup_effect, late_effect, sketch_effect, detail FROM quality.window_accuracy WHERE day = %s "
            "ORDER BY 1, 2, 3",
            (DAY,),
        )
        return truth, cur.fetchall()


def test_standalone_cluster_gives_the_rows_of_local_mode(
    pg_url: str, airflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config.load()
    counts = write_lake_day(
        GeneratorConfig(day=DAY, events=40_000, duplicates=0.01, late=0.01, lost=0.01, seed=5),
        settings.events_lake,
        settings.archive_file(DAY),
    )
    spark.submit(settings, DAY, "local-run")
    with storage.transaction(pg_url) as cur:  # the stream's values := the truth, so accuracy is computed too
        cur.execute(
            "INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events, detail) "
            "SELECT metric, group_key, window_start, window_end, day, value * 1.01, n_events, detail "
            "FROM truth.results WHERE day = %s",
            (DAY,),
        )
    t = time.monotonic()
    local = spark.submit(settings, DAY, "local-run-2")
    local_s = time.monotonic() - t
    local_rows = _rows(pg_url)
    assert sum(1 for r in local_rows[1] if r[3] is not None) == len(local_rows[1]) > 1000

    master_port = free_port()
    with spark.standalone_cluster(tmp_path / "cluster", master_port, free_port(), worker_cores=2) as url:
        monkeypatch.setenv("SPARK_MASTER", url)
        monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # the driver: reachable by the executors, on loopback
        monkeypatch.setenv(
            "BATCHMARK_SPARK_CONF",
            "spark.driver.host=127.0.0.1 spark.driver.bindAddress=127.0.0.1 spark.ui.enabled=false",
        )
        monkeypatch.setenv("BATCHMARK_SPARK_EXECUTOR_MEMORY", "1g")
        python = tmp_path / "cluster-python"  # the executors' Python, from the configuration, not ours
        python.write_text(f'#!/bin/sh\ntouch "{tmp_path}/cluster-python-used"\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        monkeypatch.setenv("BATCHMARK_SPARK_PYTHON", str(python))
        cluster_settings = config.load()
        assert cluster_settings.spark_master == url
        t = time.monotonic()
        remote = spark.submit(cluster_settings, DAY, "cluster-run")
        cluster_s = time.monotonic() - t
        assert _rows(pg_url) == local_rows  # bit for bit, truth and accuracy alike
        # The DAG's SparkSubmitOperator goes wherever the Airflow connection says: point it at the cluster.
        for p in range(settings.partitions):  # the stream "has passed" the day on every partition
            write_watermark(settings.events_lake, settings.events_topic, p, day_bounds_ms(DAY)[1] + 3_600_000, 1)
        env = {**os.environ}
        subprocess.run([airflow_bin(), "connections", "delete", "batchmark_spark"], env=env, capture_output=True)
        ensure_spark_connection(dataclasses.replace(settings, spark_master=url), env)
        try:
            with storage.transaction(pg_url) as cur:
                cur.execute("DELETE FROM truth.results WHERE day = %s", (DAY,))
            run = (
                DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
                .get_dag("nightly_recompute")
                .test(run_conf={"date": DAY.isoformat()})
            )
            assert str(run.state) in ("success", "DagRunState.SUCCESS")
            assert _rows(pg_url) == local_rows
        finally:
            subprocess.run([airflow_bin(), "connections", "delete", "batchmark_spark"], env=env, capture_output=True)
            ensure_spark_connection(settings, env)
        worker_log = (tmp_path / "cluster" / "spark-worker.log").read_text()
    assert worker_log.count("Asked to launch executor") == 2  # both jobs ran on the worker's executors
    assert (tmp_path / "cluster-python-used").exists()  # ... with the configured Python
    assert remote["truth_events"] == local["truth_events"] == counts["events"]
    assert remote["rows"] == local["rows"]
    print(f"\nlocal[2] {local_s:.1f} s, standalone cluster {cluster_s:.1f} s for {counts['events']} events")
