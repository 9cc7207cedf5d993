"""The Kappa comparison end to end: a stored day replayed into two versions of the streaming app on the real
broker, each a real Faust worker, judged against the truth.

The day has out-of-order events within the stable lateness (30 s). The candidate plants two changes: a far
smaller HLL for distinct_users (lg_k 4) and no lateness for cpu_seconds, so its out-of-order events arrive late.
The comparison must call it worse on exactly those two metrics, naming sketch error and late events; a version
that changes nothing compares as the same on every metric (run through the DAG with dag.test()).
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pytest

from batchmark import config, kappa, storage
from batchmark.config import REPO_ROOT
from batchmark.generator import GeneratorConfig, generate
from tests.integration.conftest import environment

DAY = date(2026, 10, 7)
VERSIONS = """
[[version]]
label = "candidate"
description = "a far smaller HLL for distinct_users; no lateness for cpu_seconds"
[version.metrics.distinct_users]
lg_k = 4
[version.metrics.cpu_seconds]
allowed_lateness = "0s"

[[version]]
label = "copy"
description = "changes nothing"
"""


@pytest.fixture(scope="module")
def stored_day(pg_url: str, broker, home: Path) -> tuple[Path, Path]:  # noqa: ANN001
    work = home / "kappa-test"
    work.mkdir(exist_ok=True)
    definitions = work / "metrics.toml"
    definitions.write_text((REPO_ROOT / "batchmark" / "metrics.toml").read_text() + VERSIONS)
    data = work / f"day-{DAY}.jsonl"
    generate(GeneratorConfig(day=DAY, events=12_000, out_of_order=0.08, malformed=0.005), data)
    return definitions, data


def _rows(url: str, sql: str, *args: object) -> list[tuple]:
    with storage.transaction(url) as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_a_planted_candidate_is_worse_on_exactly_the_metrics_it_touches(stored_day, pg_url: str) -> None:  # noqa: ANN001
    definitions, data = stored_day
    with environment(BATCHMARK_DEFINITIONS=str(definitions)):
        result = kappa.compare_versions(config.load(), str(data), "candidate")
    verdicts = {c.metric: (c.verdict, c.cause) for c in result.metrics}
    assert {m for m, (v, _) in verdicts.items() if v != "same"} == {"cpu_seconds", "distinct_users"}, verdicts
    # no lateness: some windows' every event came late, so the candidate never wrote them
    assert verdicts["cpu_seconds"][0] == "worse" and verdicts["cpu_seconds"][1].startswith("late events")
    assert verdicts["distinct_users"] == ("worse", "sketch error")
    by = {c.metric: c for c in result.metrics}
    # the stable version counted every out-of-order event, the candidate's cpu_seconds dropped some as late
    assert by["cpu_seconds"].stable["n_late"] == 0 < by["cpu_seconds"].candidate["n_late"]
    assert by["cpu_seconds"].stable["max_error"] == 0.0  # exact, and nothing late: bit for bit
    assert by["jobs"].candidate["max_error"] == by["jobs"].stable["max_error"] == 0.0
    assert (
        by["distinct_users"].p_value < 1e-6 and by["distinct_users"].worse_windows > 0.9 * by["distinct_users"].windows
    )
    assert "worse on cpu_seconds (late events" in result.verdict and "distinct_users (sketch error)" in result.verdict
    for label in ("stable", "candidate"):
        cost = result.costs[label]
        assert cost["events_per_s"] > 0 and cost["cpu_s_per_million"] > 0 and cost["peak_rss_mb"] > 50
        assert cost["state_bytes_per_window"]["distinct_users"] > 0
    assert (
        result.costs["candidate"]["state_bytes_per_window"]["distinct_users"]
        < (result.costs["stable"]["state_bytes_per_window"]["distinct_users"])
    )  # lg_k 4 is a smaller sketch
    # stored: the run, one comparison row per metric, each version's results under its label
    assert _rows(pg_url, "SELECT status, verdict FROM quality.version_runs WHERE run_id = %s", result.run_id) == [
        ("done", result.verdict)
    ]
    stored = dict(
        _rows(pg_url, "SELECT metric, verdict FROM quality.version_comparison WHERE run_id = %s", result.run_id)
    )
    assert stored == {m: v for m, (v, _) in verdicts.items()}
    labels = dict(
        _rows(
            pg_url,
            "SELECT label, count(*) FILTER (WHERE metric <> 'cpu_seconds') FROM stream.version_results"
            " WHERE run_id = %s GROUP BY label",
            result.run_id,
        )
    )  # cpu_seconds may lose a window in the candidate: every record of it late
    assert set(labels) == {"stable", "candidate"} and labels["stable"] == labels["candidate"] > 1000
    # production is untouched: nothing of the run in stream.results, and the scratch databases are gone
    assert _rows(pg_url, "SELECT count(*) FROM pg_database WHERE datname LIKE %s", f"%_k{result.run_id[-6:]}_%") == [
        (0,)
    ]


def test_an_identical_version_compares_as_the_same_through_the_dag(stored_day, airflow_db, pg_url: str) -> None:  # noqa: ANN001
    from airflow.dag_processing.dagbag import DagBag

    definitions, data = stored_day
    with environment(BATCHMARK_DEFINITIONS=str(definitions)):
        bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        run = bag.get_dag("replay_benchmark").test(run_conf={"source": str(data), "candidate": "copy", "rate": 20000})
    states = {ti.task_id: str(ti.state).split(".")[-1].lower() for ti in run.get_task_instances()}
    assert states == {"check_request": "success", "replay_and_compare": "success", "verdict": "success"}
    (run_id, verdict), *_ = _rows(
        pg_url, "SELECT run_id, verdict FROM quality.version_runs WHERE candidate = 'copy' ORDER BY started_at DESC"
    )
    assert verdict.startswith("candidate 'copy' against 'stable': same on every metric")
    assert set(
        r[0] for r in _rows(pg_url, "SELECT verdict FROM quality.version_comparison WHERE run_id = %s", run_id)
    ) == {"same"}


def test_a_bad_request_fails_at_once_with_what_to_fix(stored_day, airflow_db) -> None:  # noqa: ANN001
    from airflow.dag_processing.dagbag import DagBag

    definitions, data = stored_day
    with environment(BATCHMARK_DEFINITIONS=str(definitions)):
        bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        run = bag.get_dag("replay_benchmark").test(run_conf={"source": str(data), "candidate": "nope"})
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert str(tis["check_request"].state).split(".")[-1].lower() == "failed"
    assert tis["check_request"].try_number == 1  # a configuration error is not retried
    with storage.transaction(os.environ["DATABASE_URL"]) as cur:
        cur.execute(
            "SELECT error FROM quality.task_failures WHERE dag_id = 'replay_benchmark' ORDER BY id DESC LIMIT 1"
        )
        (error,) = cur.fetchone()
    assert "no version 'nope'" in error and "candidate, copy" in error
