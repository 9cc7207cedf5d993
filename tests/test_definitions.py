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


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "defs.toml"
    path.write_text(text)
    return path


BASE = """[dataset]
partition_key = "tenant"

[dataset.fields]
tenant = { type = "string" }
cpu = { type = "float", min = 0.0, nullable = true }

[[metric]]
name = "jobs"
kind = "count"
group_by = ["tenant"]
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # an unknown key: its line, the table, a suggestion and the accepted keys
        (
            'allowed_latenes = "20h"\n',
            r"defs\.toml:12: \[\[metric\]\] #1 \(name 'jobs'\): allowed_latenes is not a "
            r"known key \(did you mean 'allowed_lateness'\?\); accepted keys here: allowed_lateness, capacity",
        ),
        # a wrong type
        ("window = 5.5\n", r"defs\.toml:12: .*window must be a string in quotes or a whole number, not 5\.5"),
        ('mostly = "all"\n', r"defs\.toml:12: .*mostly must be a number, not 'all'"),
        # a parameter the kind does not take
        ("q = 0.5\n", r"defs\.toml:8: metric 'jobs': kind 'count' has no parameter 'q' \(its parameters: none\)"),
        ('value = "cpu"\n', "kind 'count' counts records; remove 'value'"),
        ('where = "cpu is nul"\n', r"where 'cpu is nul' is not understood; write '<field> is null'"),
        ('where = "tenant is null"\n', "field 'tenant' is not nullable, so this is always false"),
    ],
)
def test_mistakes_in_a_definitions_file_are_refused_naming_key_and_line(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_definitions(_file(tmp_path, BASE + extra))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('b = { type = "flaot" }', r"defs\.toml:6: \[dataset\.fields\.b\]: type is 'flaot'; input should be 'string'"),
        (
            'b = { type = "float", nulable = true }',
            r"defs\.toml:6: .*nulable is not a known key \(did you mean 'nullable'",
        ),
        ('b = { type = "float", min = 5.0, max = 1.0 }', r"defs\.toml:6: field 'b': min 5.0 is above max 1.0"),
        ('b = { type = "int", max_length = -1 }', r"max_length: Input should be greater than 0"),
        ('b = { type = "string", nullable = "yes" }', "nullable must be true or false, not 'yes'"),
    ],
)
def test_mistakes_in_fields_are_refused(tmp_path: Path, fields: str, message: str) -> None:
    text = BASE.replace('cpu = { type = "float", min = 0.0, nullable = true }', fields)
    with pytest.raises(ConfigError, match=message):
        load_definitions(_file(tmp_path, text))


def test_a_misspelt_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"defs\.toml:1: the top level: datset is not a known key \(did you mean 'dataset'"
    ):
        load_definitions(_file(tmp_path, BASE.replace("[dataset]", "[datset]", 1)))


def test_a_nullable_group_key_is_refused(tmp_path: Path) -> None:
    text = BASE.replace('tenant = { type = "string" }', 'tenant = { type = "string", nullable = true }')
    with pytest.raises(ConfigError, match="partition_key 'tenant' cannot be nullable"):
        load_definitions(_file(tmp_path, text))


def test_nullable_fields_and_where_clauses_say_which_records_a_metric_reads(tmp_path: Path) -> None:
    text = BASE + '\n[[metric]]\nname = "cpu_sum"\nkind = "sum"\nvalue = "cpu * 2"\ngroup_by = ["tenant"]\n'
    text += '\n[[metric]]\nname = "no_cpu"\nkind = "count"\nwhere = "cpu is null"\ngroup_by = ["tenant"]\n'
    defs = load_definitions(_file(tmp_path, text))
    jobs, cpu_sum, no_cpu = defs.metrics
    rows = [{"tenant": "a", "cpu": 1.0}, {"tenant": "a", "cpu": None}]
    assert [jobs.present(r) for r in rows] == [True, True] and jobs.reads_every_record
    assert [cpu_sum.present(r) for r in rows] == [True, False] and cpu_sum.needs == ("cpu",)
    assert [no_cpu.present(r) for r in rows] == [False, True]
    import pandas as pd

    frame = pd.DataFrame(rows)
    assert cpu_sum.present_mask(frame).tolist() == [True, False]
    assert no_cpu.present_mask(frame).tolist() == [False, True]


def test_a_where_clause_that_leaves_nothing_to_read_is_refused(tmp_path: Path) -> None:
    text = (
        BASE + '\n[[metric]]\nname = "s"\nkind = "sum"\nvalue = "cpu"\nwhere = "cpu is null"\ngroup_by = ["tenant"]\n'
    )
    with pytest.raises(
        ConfigError, match=r"defs\.toml:13: metric 's': where 'cpu is null' .* could never read a record"
    ):
        load_definitions(_file(tmp_path, text))
