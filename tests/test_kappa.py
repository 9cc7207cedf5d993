"""The Kappa comparison's parts that need no broker: versions in the definitions file, the sign test and the
per-metric judgement, sources, and the Lambda serving view (the end-to-end runs are in
tests/integration/test_kappa.py)."""

from __future__ import annotations

import math
import re
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from psycopg2 import sql

from batchmark import config, kappa, storage
from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from batchmark.errors import ConfigError

# the default definitions without their own [[version]] tables
DEFAULT = (REPO_ROOT / "batchmark" / "metrics.toml").read_text().split("[[version]]")[0]
VERSIONS = """
[[version]]
label = "small-hll"
description = "a quarter of the HLL"
[version.metrics.distinct_users]
lg_k = 10
[version.worker]
take_max = 2000

[[version]]
label = "no-lateness"
[version.metrics."*"]
allowed_lateness = "0s"
"""


def _defs(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(DEFAULT + extra)
    return path


def test_a_version_is_the_definitions_with_its_overrides(tmp_path: Path) -> None:
    path = _defs(tmp_path, VERSIONS)
    stable = load_definitions(path)
    small = load_definitions(path, version="small-hll")
    late = load_definitions(path, version="no-lateness")
    assert [v.label for v in stable.versions] == ["small-hll", "no-lateness"]
    assert stable.metric("distinct_users").params.get("lg_k", 12) == 12
    assert small.metric("distinct_users").params["lg_k"] == 10 and small.version == "small-hll"
    assert small.metric("jobs") == stable.metric("jobs")  # untouched metrics are the same objects' equals
    assert {m.allowed_lateness_ms for m in late.metrics} == {0} and stable.metric("jobs").allowed_lateness_ms > 0
    assert stable.version_spec("small-hll").worker_env() == {"BATCHMARK_TAKE_MAX": "2000"}
    assert stable.version_spec("small-hll").changes() == "distinct_users: lg_k = 10; worker take_max = 2000"
    gc_off = load_definitions(_defs(tmp_path, '[[version]]\nlabel = "gc-off"\n[version.worker]\ngc_young = 0\n'))
    assert gc_off.version_spec("gc-off").worker_env() == {"BATCHMARK_GC_YOUNG": "0"}  # Python's own GC, to compare
    fine = '[[version]]\nlabel = "fine"\n[version.worker]\ntake_within = 0.5\ncheckpoint_interval_s = 0.2\n'
    spec = load_definitions(_defs(tmp_path, fine)).version_spec("fine")  # fractions below 1 are settings too
    assert spec.worker_env() == {"BATCHMARK_TAKE_WITHIN": "0.5", "BATCHMARK_CHECKPOINT_INTERVAL_S": "0.2"}
    assert stable.version_spec("stable").changes() == "nothing"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[version]]\nlabel = "stable"\n', "label 'stable' is taken"),
        ('[[version]]\nlabel = "Big HLL"\n', "label"),
        ('[[version]]\nlabel = "x"\n[version.metrics.nope]\nlg_k = 10\n', "metrics.nope is not a metric here"),
        ('[[version]]\nlabel = "x"\n[version.metrics.jobs]\nkind = "sum"\n', "metrics.jobs.kind cannot be changed"),
        ('[[version]]\nlabel = "x"\n[version.worker]\ntake_mx = 5\n', "worker.take_mx is not a worker setting"),
        ('[[version]]\nlabel = "x"\n[version.worker]\ntake_max = 0.5\n', "worker.take_max must be a whole number"),
        ('[[version]]\nlabel = "x"\n[version.worker]\ntake_max = 0\n', "take_max must be a whole number from 1 to"),
        ('[[version]]\nlabel = "x"\n[version.worker]\ngc_young = -1\n', "gc_young must be a whole number from 0"),
        ('[[version]]\nlabel = "x"\n[version.worker]\ntake_within = 0\n', "take_within must be a number from 0.001"),
        ('[[version]]\nlabel = "x"\n[version.worker]\nmax_fetch_size = 1\n', "max_fetch_size must be a whole"),
        ('[[version]]\nlabel = "x"\n[[version]]\nlabel = "x"\n', "labels must be unique"),
    ],
)
def test_a_wrong_version_is_refused_with_what_to_fix(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_definitions(_defs(tmp_path, extra))


def test_an_override_the_kind_refuses_names_the_version(tmp_path: Path) -> None:
    path = _defs(tmp_path, '[[version]]\nlabel = "tiny"\n[version.metrics.distinct_users]\nlg_k = 2\n')
    load_definitions(path)  # the stable definitions are fine
    with pytest.raises(ConfigError, match=r"\[\[version\]\] 'tiny': metric 'distinct_users': lg_k must be between 4"):
        load_definitions(path, version="tiny")
    with pytest.raises(ConfigError, match="no version 'huge'.*stable, tiny"):
        load_definitions(path, version="huge")


def test_the_shipped_versions_load() -> None:
    path = REPO_ROOT / "batchmark" / "metrics.toml"
    labels = [v.label for v in load_definitions(path).versions]
    assert labels == ["small-sketches", "tight-lateness"]
    small = load_definitions(path, version="small-sketches")
    assert small.metric("distinct_users").params["lg_k"] == 10
    assert {small.metric(f"duration_p{q}").params["k"] for q in (50, 95, 99)} == {100}  # still one shared KLL
    assert {m.allowed_lateness_ms for m in load_definitions(path, version="tight-lateness").metrics} == {5000}


def test_sign_test_is_exact() -> None:
    assert kappa.sign_test([0.0, 0.0]) == (0, 0, 2, 1.0)
    worse, better, ties, p = kappa.sign_test([1.0] * 10)
    assert (worse, better, ties) == (10, 0, 0) and p == pytest.approx(2 / 2**10)
    # 8 worse, 2 better: P(X <= 2) for Binomial(10, 1/2) = (1 + 10 + 45) / 1024, two-sided
    assert kappa.sign_test([1.0] * 8 + [-1.0] * 2 + [0.0] * 5)[3] == pytest.approx(2 * 56 / 1024)
    assert kappa.sign_test([1.0, -1.0])[3] == 1.0


def _frame(metric: str, errors: list[float], **extra: list[float]) -> pd.DataFrame:
    n = len(errors)
    cols = {"n_late": [0] * n, "n_lost": [0] * n, "n_dup": [0] * n}
    cols |= {k: [0.0] * n for k in ("late_effect", "lost_effect", "dup_effect", "sketch_effect")}
    cols |= extra
    return pd.DataFrame(
        {"metric": metric, "group_key": [f"g{i}" for i in range(n)], "window_start_ms": [0] * n, "error": errors}
        | {"stream_value": [None if math.isinf(e) else 1.0 for e in errors]}
        | cols
    )


def test_judge_calls_a_planted_difference_and_names_its_cause(tmp_path: Path) -> None:
    defs = load_definitions(_defs(tmp_path, "")).only(["cpu_seconds", "distinct_users", "duration_p50"])
    n = 40
    stable = pd.concat(
        [
            _frame("cpu_seconds", [0.0] * n),
            _frame("distinct_users", [0.01] * n),
            _frame("duration_p50", [0.002 + 1e-5 * (i % 3) for i in range(n)]),
        ]
    )
    candidate = pd.concat(
        [
            _frame(
                "cpu_seconds", [0.05] * 30 + [0.0] * 10, n_late=[2] * 30 + [0] * 10, late_effect=[1.0] * 30 + [0.0] * 10
            ),
            _frame("distinct_users", [0.2] * n, sketch_effect=[3.0] * n),
            # KLL noise: most windows differ a little either way, the mean barely moves: not a difference
            _frame("duration_p50", [0.002 + 1e-5 * ((i + 1) % 3) for i in range(n)]),
        ]
    )
    out = {c.metric: c for c in kappa.judge({"stable": stable, "cand": candidate}, "stable", "cand", defs)}
    assert (out["cpu_seconds"].verdict, out["cpu_seconds"].cause) == ("worse", "late events")
    assert (out["cpu_seconds"].worse_windows, out["cpu_seconds"].better_windows) == (30, 0)
    assert (out["distinct_users"].verdict, out["distinct_users"].cause) == ("worse", "sketch error")
    assert out["duration_p50"].verdict == "same" and out["duration_p50"].cause == "none"
    reverse = {c.metric: c for c in kappa.judge({"a": candidate, "b": stable}, "a", "b", defs)}
    assert reverse["cpu_seconds"].verdict == "better" and reverse["distinct_users"].verdict == "better"
    costs = {
        "stable": {"cpu_s_per_million": 10.0, "peak_rss_mb": 200.0},
        "cand": {"cpu_s_per_million": 13.0, "peak_rss_mb": 100.0},
    }
    line = kappa.verdict_line("cand", "stable", list(out.values()), costs)
    assert line == (
        "candidate 'cand' against 'stable': worse on cpu_seconds (late events), distinct_users (sketch error); "
        "same on duration_p50; 1.30x the CPU per event; 0.50x the peak memory"
    )


def test_sources_are_refused_with_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHMARK_HOME", str(tmp_path / "home"))
    s = config.load()
    with pytest.raises(ConfigError, match="give a source"):
        kappa.check_source(s, " ")
    with pytest.raises(ConfigError, match="no events for 2026-11-24: neither an archive"):
        kappa.check_source(s, "2026-11-24")
    with pytest.raises(ConfigError, match="neither a day .* nor an existing file"):
        kappa.check_source(s, str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ConfigError, match="must be .jsonl, .csv or .parquet"):
        kappa.check_source(s, str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError, match="both 'stable'"):
        kappa.compare_versions(s, "2026-11-24", "stable")


def test_the_serving_view_switches_a_day_from_stream_to_truth_when_it_is_validated(pg_url: str) -> None:
    day = date(2031, 3, 4)
    metric = "serving_probe"
    try:
        with storage.transaction(pg_url) as cur:
            for g, v in (("a", 1.0), ("b", 2.0)):
                cur.execute(
                    """INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events)
                       VALUES (%s, %s, '2031-03-04T10:00Z', '2031-03-04T10:01Z', %s, %s, 1)""",
                    (metric, g, day, v),
                )
        rows = _serving(pg_url, metric)
        assert rows == [("a", 1.0, "stream"), ("b", 2.0, "stream")]
        with storage.transaction(pg_url) as cur:  # the recompute lands: truth, but not validated yet
            for g, v in (("a", 1.5), ("b", 2.0), ("c", 7.0)):  # c: a window the stream never had
                cur.execute(
                    """INSERT INTO truth.results (metric, group_key, window_start, window_end, day, value, n_events,
                                                  run_id)
                       VALUES (%s, %s, '2031-03-04T10:00Z', '2031-03-04T10:01Z', %s, %s, 1, 'test')""",
                    (metric, g, day, v),
                )
        assert _serving(pg_url, metric) == rows
        with storage.transaction(pg_url) as cur:  # validated: the day is served from the truth
            cur.execute(
                """INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing,
                       over_tolerance, tolerance) VALUES ('test', %s, %s, false, 3, 1, 1, 0)""",
                (day, metric),
            )
        assert _serving(pg_url, metric) == [("a", 1.5, "truth"), ("b", 2.0, "truth"), ("c", 7.0, "truth")]
    finally:
        with storage.transaction(pg_url) as cur:
            for schema, table in (("stream", "results"), ("truth", "results"), ("quality", "accuracy_history")):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE metric = %s").format(sql.Identifier(schema, table)), (metric,)
                )


def _serving(url: str, metric: str) -> list[tuple[str, float, str]]:
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT group_key, value, source, value_time IS NOT NULL FROM serving.results WHERE metric = %s"
            " ORDER BY group_key",
            (metric,),
        )
        rows = cur.fetchall()
    assert all(r[3] for r in rows)
    return [r[:3] for r in rows]


def test_sign_test_p_values_are_probabilities() -> None:
    for worse in range(0, 12):
        for better in range(0, 12):
            p = kappa.sign_test([1.0] * worse + [-1.0] * better)[3]
            assert 0 < p <= 1 and (worse != better or math.isclose(p, 1.0))


def test_a_worse_candidate_still_within_tolerance_says_so(tmp_path: Path) -> None:
    defs = load_definitions(_defs(tmp_path, "")).only(["duration_p95"])
    tolerance = defs.metric("duration_p95").tolerance
    stable = _frame("duration_p95", [tolerance / 10] * 50)
    candidate = _frame("duration_p95", [tolerance / 2] * 50, sketch_effect=[1.0] * 50)
    (c,) = kappa.judge({"s": stable, "c": candidate}, "s", "c", defs)
    assert (c.verdict, c.candidate["within_tolerance"]) == ("worse", 1.0)
    assert kappa.verdict_line("c", "s", [c], {"s": {}, "c": {}}) == (
        "candidate 'c' against 's': worse on duration_p95 (sketch error, still within tolerance)"
    )


def test_lost_windows_mixed_directions_and_other_windows_are_not_called_same(tmp_path: Path) -> None:
    path = _defs(tmp_path, '[[version]]\nlabel = "five"\n[version.metrics.jobs]\nwindow = "5m"\n')
    defs = load_definitions(path).only(["jobs", "cpu_seconds", "mem_gb_mean"])
    five = load_definitions(path, version="five")
    n = 60
    stable = pd.concat([_frame("jobs", [0.0] * n), _frame("cpu_seconds", [0.0] * n), _frame("mem_gb_mean", [0.1] * n)])
    candidate = pd.concat(
        [
            _frame("jobs", [0.0] * n),
            _frame("cpu_seconds", [0.0] * 55 + [math.inf] * 5),  # five windows never written: all wrong
            # a little better in 40 windows, much worse in 20: the mean rose while most windows improved
            _frame("mem_gb_mean", [0.09] * 40 + [0.5] * 20),
        ]
    )
    out = {c.metric: c for c in kappa.judge({"s": stable, "c": candidate}, "s", "c", defs, five)}
    assert out["jobs"].verdict == "not paired" and out["jobs"].windows == 0  # 1m windows against 5m ones
    assert out["cpu_seconds"].verdict == "worse"
    assert out["cpu_seconds"].cause == "window values (no attribution moved); windows missing 0 -> 5"
    assert out["cpu_seconds"].candidate["max_error"] == math.inf and out["cpu_seconds"].candidate["missing"] == 5
    assert out["mem_gb_mean"].verdict == "mixed"
    assert kappa.jsonable({"a": math.inf, "b": [math.nan, 1.0]}) == {"a": "inf", "b": [None, 1.0]}


def test_a_star_parameter_reaches_only_the_kinds_that_take_it(tmp_path: Path) -> None:
    star = '[[version]]\nlabel = "k400"\n[version.metrics."*"]\nk = 400\nallowed_lateness = "1s"\n'
    v = load_definitions(_defs(tmp_path, star), version="k400")
    assert {v.metric(f"duration_p{q}").params["k"] for q in (50, 95, 99)} == {400}
    assert v.metric("top_users").params["k"] == 400  # top-k's k too: the same name
    assert "k" not in v.metric("jobs").params and {m.allowed_lateness_ms for m in v.metrics} == {1000}
    only_jobs = DEFAULT.split("[[metric]]")[0] + '[[metric]]\nname = "jobs"\nkind = "count"\ngroup_by = ["tenant"]\n'
    path = tmp_path / "jobs.toml"
    path.write_text(only_jobs + '[[version]]\nlabel = "x"\n[version.metrics."*"]\ncapacity = 64\n')
    with pytest.raises(ConfigError, match="no metric here takes 'capacity'"):
        load_definitions(path, version="x")


def test_the_sign_test_is_fast_and_right_for_many_windows() -> None:
    # 20,000 paired windows, 10,200 worse: z = 2.83, two-sided p = 0.0047 (normal approximation)
    p = kappa.sign_test([1.0] * 10_200 + [-1.0] * 9_800)[3]
    assert 0.0040 < p < 0.0052
    exact = 2 * sum(math.comb(30, i) for i in range(9)) / 2**30  # 22 worse, 8 better, exactly
    assert kappa.sign_test([1.0] * 22 + [-1.0] * 8)[3] == pytest.approx(exact, rel=1e-12)
