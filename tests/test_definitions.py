"""The definitions file: the default loads, and every mistake is refused with what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchmark.config import REPO_ROOT
from batchmark.definitions import compile_value, load_definitions, parse_duration_ms
from batchmark.errors import ConfigError

DEFAULT = REPO_ROOT / "batchmark" / "metrics.toml"


def test_default_definitions_cover_every_kind_with_theoretical_tolerances() -> None:
    import math

    from batchmark.aggregates import AGGREGATES

    defs = load_definitions(DEFAULT)
    assert {m.kind for m in defs.metrics} == set(AGGREGATES)
    by_name = {m.name: m for m in defs.metrics}
    assert by_name["distinct_users"].tolerance == pytest.approx(3 * 1.04 / math.sqrt(2**12))
    assert by_name["node_packing"].tolerance == 1.7
    assert 0.005 < by_name["duration_p95"].tolerance < 0.02  # KLL k=200: about 1.3%
    assert by_name["jobs"].tolerance == 0.0 and by_name["jobs"].mostly == 1.0
    assert by_name["distinct_users"].mostly == 0.99
    cpu = defs.metric("cpu_seconds")
    assert cpu.value_fn({"cpu": 2.0, "duration_s": 30.0}) == 60.0
    assert cpu.value_sql == "`cpu` * `duration_s`"
    assert cpu.window_ms == 60_000 and cpu.allowed_lateness_ms == 30_000


@pytest.mark.parametrize(("text", "ms"), [("30s", 30_000), ("1m", 60_000), ("2h", 7_200_000), ("250ms", 250)])
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('id')", "cpu.real", "cpu if cpu else 0", "tenant * 2", "open", "cpu ** 2"],
)
def test_value_expressions_only_allow_arithmetic_on_numeric_fields(expr: str) -> None:
    with pytest.raises(ConfigError):
        compile_value(expr, {"cpu", "duration_s"})


def _write(tmp_path: Path, metric: str) -> Path:
    text = DEFAULT.read_text().split("[[metric]]")[0] + "[[metric]]\n" + metric
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ('name = "x"\nkind = "median"\ngroup_by = ["tenant"]\n', "kind 'median'"),
        ('name = "x"\nkind = "sum"\ngroup_by = ["tenant"]\n', "needs a 'value'"),
        ('name = "x"\nkind = "count"\ngroup_by = ["tenant"]\nwindow = "7m"\n', "divide one day"),
        ('name = "x"\nkind = "count"\ngroup_by = ["user"]\n', "partition key"),
        ('name = "x"\nkind = "count"\ngroup_by = ["nope"]\n', "not a dataset field"),
        ('name = "X Y"\nkind = "count"\n', "lower_snake_case"),
        ('name = "x"\nkind = "quantile"\nvalue = "cpu"\ngroup_by = ["tenant"]\n', "needs 'q'"),
        ('name = "x"\nkind = "quantile"\nvalue = "cpu"\nq = 1.5\ngroup_by = ["tenant"]\n', "between 0 and 1"),
        ('name = "x"\nkind = "distinct"\ngroup_by = ["tenant"]\n', "needs 'field'"),
        ('name = "x"\nkind = "distinct"\nfield = "user"\nlg_k = 30\ngroup_by = ["tenant"]\n', "lg_k"),
        ('name = "x"\nkind = "binpack"\nvalue = "mem_gb"\ngroup_by = ["tenant"]\n', "needs 'capacity'"),
        ('name = "x"\nkind = "count"\ngroup_by = ["tenant"]\nmostly = 0\n', "mostly"),
    ],
)
def test_bad_metric_is_refused_with_a_reason(tmp_path: Path, metric: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_definitions(_write(tmp_path, metric))


def test_unknown_metric_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="jobs, cpu_seconds, mem_gb_mean"):
        load_definitions(DEFAULT).metric("nope")
