"""A metric kind is one class: a new kind, written here in the test alone, works everywhere a kind is used.

`Range` (max - min, times a `scale` parameter) is registered with ``aggregates.register`` and nothing else is
touched: the definitions file accepts it and checks its parameter, the stream engine and the batch compute give
the same values, and quality.comparison (the view GX checks) judges it with the kind's own error SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from psycopg2 import sql

from batchmark import storage
from batchmark.aggregates import AGGREGATES, Aggregate, Detail, Param, impossible_sql, register
from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from batchmark.errors import ConfigError
from tests.test_custom_dataset import _stream_and_batch

DATASET = (REPO_ROOT / "batchmark" / "metrics.toml").read_text().split("[[metric]]")[0]


class Range(Aggregate):
    """max - min of a window's values, times `scale`; exact online and offline."""

    kind = "range"
    defined_on_empty = False
    params_spec = {"scale": Param(float, required=True, low=0, low_open=True, example="1")}
    error_name = "absolute difference"
    error_sql = "abs(s.value - t.value)"
    impossible_sql = "stream_value < 0"
    advice = "look at the widest window of {metric}."

    def new(self) -> list[float]:
        return [math.inf, -math.inf]

    def add(self, state: list[float], value: float) -> list[float]:
        return [min(state[0], value), max(state[1], value)]

    def result(self, state: list[float]) -> tuple[float, Detail]:
        return (state[1] - state[0]) * self.params["scale"], None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return (max(values) - min(values)) * self.params["scale"], None


@pytest.fixture
def range_kind() -> Iterator[type[Aggregate]]:
    register(Range)
    try:
        yield Range
    finally:
        AGGREGATES.pop("range")


def _defs(tmp_path: Path, metric: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(DATASET + "[[metric]]\n" + metric)
    return path


SPREAD = 'name = "cpu_spread"\nkind = "range"\nvalue = "cpu"\ngroup_by = ["tenant"]\nwindow = "1m"\nscale = 2\n'


def test_the_definitions_take_the_new_kind_and_check_its_parameter(range_kind: Any, tmp_path: Path) -> None:
    m = load_definitions(_defs(tmp_path, SPREAD)).metric("cpu_spread")
    assert m.kind == "range" and m.params == {"scale": 2} and m.aggregate.exact([1.0, 4.0]) == (6.0, None)
    assert m.tolerance == 0.0 and m.mostly == 1.0  # not probabilistic, bound 0: the defaults of an exact kind
    for text, message in [
        (SPREAD.replace("scale = 2", "scale = -1"), "metric 'cpu_spread': scale must be a positive number"),
        (SPREAD.replace("scale = 2\n", ""), "kind 'range' needs 'scale', e.g. scale = 1"),
        (SPREAD.replace("scale = 2", 'scale = "2"'), "scale"),
        (
            'name = "jobs"\nkind = "count"\ngroup_by = ["tenant"]\nscale = 2\n',
            "kind 'count' has no parameter 'scale' (its parameters: none)",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_definitions(_defs(tmp_path, text))


def test_without_the_kind_its_parameter_is_an_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind 'range' is not one of|scale is not a known key"):
        load_definitions(_defs(tmp_path, SPREAD))


def _event(i: int, tenant: str, minute: int, cpu: float) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"e{i}",
            "event_time": f"2026-11-24T10:{minute:02d}:{i % 50:02d}Z",
            "tenant": tenant,
            "user": f"u{i % 7}",
            "job_id": f"j{i}",
            "cpu": cpu,
            "mem_gb": 1.0,
            "duration_s": 10.0,
        }
    )


def test_stream_and_batch_agree_and_the_view_judges_it_with_its_own_sql(
    range_kind: Any, tmp_path: Path, pg_url: str
) -> None:
    defs = load_definitions(_defs(tmp_path, SPREAD))
    cpus = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    records = [_event(i, f"t{i % 3}", i // 50, cpus[(i * 5) % 7]) for i in range(200)]  # in time order
    events, stream, _, batch = _stream_and_batch(defs, records)  # both engines, as in the custom-dataset tests
    # an independent computation: (max - min) * 2 per tenant and minute
    want: dict[tuple[str, int], list[float]] = {}
    for e in events:
        want.setdefault((e["tenant"], e["event_time_ms"] // 60_000 * 60_000), []).append(e["cpu"])
    assert {(g, s): v for (_, g, s), (v, _) in stream.items()} == {k: (max(v) - min(v)) * 2 for k, v in want.items()}
    assert len(batch) == len(want) == 12
    assert (batch.value == batch.stream_value).all() and (batch.error == 0).all()

    storage.init_schema(pg_url)  # the view now has the kind's error SQL
    try:
        with storage.transaction(pg_url) as cur:
            cur.execute("DELETE FROM truth.results WHERE metric = 'cpu_spread'")
            cur.execute("DELETE FROM stream.results WHERE metric = 'cpu_spread'")
            cur.execute(
                "INSERT INTO quality.metrics (metric, kind, tolerance, mostly) VALUES ('cpu_spread', 'range', 0, 1)"
                " ON CONFLICT (metric) DO UPDATE SET kind = 'range'"
            )
            rows = [("t0", "2026-11-24T10:00:00Z", 10.0, 12.5), ("t1", "2026-11-24T10:00:00Z", 4.0, -1.0)]
            cur.executemany(
                """INSERT INTO truth.results (metric, group_key, window_start, window_end, day, value, n_events, run_id)
                   VALUES ('cpu_spread', %s, %s, %s::timestamptz + interval '1 minute', '2026-11-24', %s, 3, 'test')""",
                [(r[0], r[1], r[1], r[2]) for r in rows],
            )
            cur.executemany(
                """INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events)
                   VALUES ('cpu_spread', %s, %s, %s::timestamptz + interval '1 minute', '2026-11-24', %s, 3)""",
                [(r[0], r[1], r[1], r[3]) for r in rows],
            )
            cur.execute(
                sql.SQL("SELECT group_key, error, {} FROM quality.comparison WHERE metric = 'cpu_spread'"
                        " ORDER BY group_key").format(sql.SQL(impossible_sql()))  # the kinds' own SQL
            )  # fmt: skip
            # the kind's absolute difference, not the default relative error (0.25 for t0); -1 is impossible
            assert cur.fetchall() == [("t0", 2.5, False), ("t1", 5.0, True)]
    finally:
        with storage.transaction(pg_url) as cur:
            for schema, table in (("truth", "results"), ("stream", "results"), ("quality", "metrics")):
                cur.execute(sql.SQL("DELETE FROM {} WHERE metric = 'cpu_spread'").format(sql.Identifier(schema, table)))
        AGGREGATES.pop("range")
        storage.init_schema(pg_url)
        register(Range)  # the fixture removes it again


def test_the_kinds_table_in_the_docs_names_each_kinds_parameters() -> None:
    text = (REPO_ROOT / "docs" / "datasets.md").read_text()
    table = text.split("## Metric kinds and their parameters")[1].split("\n\n")[1]
    documented: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        kinds, params = line.split("|")[1:3]
        for kind in re.findall(r"`(\w+)`", kinds):
            documented[kind] = set(re.findall(r"`(\w+)`", params))
    assert documented == {k: set(cls.params_spec) for k, cls in AGGREGATES.items()}
