"""replay_benchmark: the Kappa comparison -- a stored day replayed into two versions of the streaming app.

A batch dataset never changes once collected, so it is a benchmark. Trigger this DAG from the UI with the
source and the two versions: it replays the source record by record into a fresh topic (the same records in the
same order, event times kept), runs the stable and the candidate version on it side by side (separate workers
and consumer groups, scratch databases: production is not touched), waits until both have consumed everything
and closed every window, and judges both against the truth of the same records.

    check_request  ->  replay_and_compare  ->  verdict

1. check_request: the versions exist in the definitions file (`[[version]]` tables; `batchmark versions` lists
   them) and differ, the source is a day of the lake or a stored file, the rate is positive -- refused at once
   with what to fix otherwise.
2. replay_and_compare: `batchmark.kappa.compare_versions`: per metric, each version's error against the truth
   (max, mean, share within tolerance) and its attribution (late, lost, duplicates, sketch); the candidate
   against the stable version, better / same / worse (or mixed, not paired) by a paired sign test over the
   windows; each version's cost (events/s, CPU per million events, peak memory, state bytes per window,
   close -> visible latency).
   Stored in `quality.version_comparison` (and the run in `quality.version_runs`); each version's results under
   its label in `stream.version_results`.
3. verdict: the comparison's table and the verdict line ("candidate is worse on cpu_seconds (late events) ...").

The broker (KAFKA_BOOTSTRAP_SERVERS) and Postgres must be reachable; the database role must be allowed to
create databases (each version writes to its own scratch database, dropped afterwards).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task

from batchmark import orchestration

LABEL = r"^[a-z][a-z0-9_-]{0,39}$"

with DAG(
    dag_id="replay_benchmark",
    description="Kappa: replay a stored day into a stable and a candidate version of the stream and compare them",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # two workers per run already share the machine
    is_paused_upon_creation=False,  # it only runs when triggered
    tags=["batchmark", "kappa"],
    params={
        "source": Param(
            "",
            type="string",
            minLength=1,
            title="Source",
            description="A day of the lake (YYYY-MM-DD; its archive when there is one) or a stored file's path "
            "(.jsonl, .csv, .parquet) on the worker's machine.",
        ),
        "stable": Param(
            "stable",
            type="string",
            pattern=LABEL,
            title="Stable version",
            description="The version to compare against; 'stable' is the definitions as written (production).",
        ),
        "candidate": Param(
            "",
            type="string",
            pattern=LABEL,
            title="Candidate version",
            description="A [[version]] label of the definitions file (`batchmark versions` lists them).",
        ),
        "rate": Param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            title="Rate (records/s)",
            description="Replay at this pace, the workers meeting it as a live stream. Empty: as fast as possible.",
        ),
    },
    default_args=orchestration.default_args("replay_benchmark"),
    doc_md=__doc__,
) as dag:

    @task
    def check_request() -> dict[str, Any]:
        """Refuse an unknown or equal pair of versions, a missing source or a bad rate, saying what to fix."""
        from batchmark import config
        from batchmark.definitions import load_definitions
        from batchmark.errors import ConfigError

        params = get_current_context()["params"] or {}
        source, stable, candidate = params.get("source") or "", params.get("stable") or "", params.get("candidate")
        if not candidate:
            raise ConfigError("give the candidate version: a [[version]] label of the definitions file")
        if stable == candidate:
            raise ConfigError(f"stable and candidate are both {stable!r}: compare two different versions")
        settings = config.load()
        for label in (stable, candidate):
            load_definitions(settings.definitions_path, version=label)
        from batchmark.kappa import check_source

        check_source(settings, source)
        return {"source": source, "stable": stable, "candidate": candidate, "rate": params.get("rate")}

    @task  # a retry starts afresh: a new topic, new scratch databases, a new run id
    def replay_and_compare(request: dict[str, Any]) -> dict[str, Any]:
        """Replay the source, run both versions side by side, judge them; returns the verdict and where it is."""
        from batchmark import config, kappa

        result = kappa.compare_versions(
            config.load(), request["source"], request["candidate"], stable=request["stable"], rate=request["rate"]
        )
        print(result.table())
        return {"run_id": result.run_id, "verdict": result.verdict, "json": str(result.path)}

    @task
    def verdict(result: dict[str, Any]) -> str:
        """The verdict line, where the run's figures are stored."""
        print(result["verdict"])
        print(f"quality.version_comparison run_id {result['run_id']!r}; JSON {result['json']}")
        return result["verdict"]

    verdict(replay_and_compare(check_request()))
