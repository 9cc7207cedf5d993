"""The recompute as the Spark provider's SparkSubmitOperator, through the Airflow connection `batchmark_spark`.

Where Spark runs is the connection's business, as Airflow users expect: its host is the master (`local[*]`,
`spark://host:7077`, `yarn`, ...), set once from SPARK_MASTER when the metadata DB is migrated and changed in
the UI (Admin -> Connections) or with `batchmark airflow connections ...` afterwards; the job's own settings
(shuffle partitions, memory, cores, the executors' Python, extra conf) come from batchmark's configuration
(BATCHMARK_SPARK_*). The operator reads both when the task runs, not when the DAG file is parsed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from batchmark import orchestration
from batchmark.airflow_env import SPARK_CONN_ID as CONN_ID
from batchmark.spark import JOB, RESULT_PREFIX, check_java, environment, error_excerpt, job_args, job_conf


class _ResultHook(SparkSubmitHook):
    """The provider's hook, also keeping the job's BATCHMARK_RESULT line and the tail of its output."""

    result: dict[str, Any] | None = None
    tail: list[str]

    def _process_spark_submit_log(self, itr: Iterator[Any]) -> None:
        self.tail = []

        def tee() -> Iterator[Any]:
            for line in itr:
                if line.startswith(RESULT_PREFIX):
                    self.result = json.loads(line[len(RESULT_PREFIX) :])
                self.tail = [*self.tail[-400:], line.rstrip("\n")]
                yield line

        super()._process_spark_submit_log(tee())


class RecomputeOperator(SparkSubmitOperator):
    """spark-submit batch/recompute.py for the run's day on the connection's master; returns the job's summary
    and publishes the truth Asset with the day in its extra."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(application=str(JOB), conn_id=CONN_ID, name="batchmark-recompute", **kwargs)

    def _get_hook(self) -> SparkSubmitHook:
        hook = super()._get_hook()
        hook.__class__ = _ResultHook  # same state, plus the result capture
        return hook

    def execute(self, context: Any) -> dict[str, Any]:  # type: ignore[override]
        from airflow.exceptions import AirflowException

        from batchmark import config

        check_java()
        settings = config.load()
        day = orchestration.context_day()
        master = SparkSubmitHook(conn_id=CONN_ID)._connection["master"]
        self.conf = job_conf(settings, master)
        self.application_args = job_args(settings, day, orchestration.context_run_id())
        env = environment(settings, master)
        self.env_vars = {k: v for k, v in env.items() if os.environ.get(k) != v}  # the hook adds os.environ
        self._hook = None
        try:
            super().execute(context)
        except AirflowException as exc:
            tail = "\n".join(getattr(self._hook, "tail", []))
            raise AirflowException(f"spark recompute for {day} failed: {exc}\n{error_excerpt(tail)}") from None
        result = getattr(self._hook, "result", None)
        if result is None:
            raise AirflowException(f"spark recompute for {day} ended without its result line")
        context["outlet_events"][orchestration.truth_asset()].extra = {"day": day.isoformat()}
        return result
