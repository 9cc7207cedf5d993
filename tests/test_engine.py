"""Stream-side windows: watermark, lateness, closing, and non-destructive checkpoints."""

from __future__ import annotations

import math
import random
from pathlib import Path

from batchmark.aggregates import Sum
from batchmark.definitions import load_definitions
from batchmark.engine import PartitionState
from batchmark.windows import window_start

DEFS = load_definitions(Path(__file__).parent / "data" / "exact_metrics.toml")
T0 = 1_795_478_400_000  # 2026-11-24T00:00:00Z


def ev(i: int, t_ms: int, tenant: str = "a", cpu: float = 1.0, dur: float = 10.0) -> dict:
    return {
        "event_id": f"e{i}",
        "event_time_ms": t_ms,
        "tenant": tenant,
        "user": "u",
        "job_id": "j",
        "cpu": cpu,
        "mem_gb": 1.0,
        "duration_s": dur,
    }


def test_window_closes_only_after_lateness() -> None:
    st = PartitionState(DEFS)
    st.add(ev(1, T0 + 1_000), offset=0)
    st.add(ev(2, T0 + 60_000 + 29_000), offset=1)  # watermark: end of window 0 + 29 s < lateness 30 s
    assert st.close_ready()[0] == []
    assert not st.has_closed_windows()
    st.add(ev(3, T0 + 60_000 + 30_000), offset=2)
    assert st.has_closed_windows()  # the worker checkpoints soon after this, not a full interval later
    rows, keys = st.close_ready()
    assert {(r.metric, r.window_start_ms, r.value) for r in rows} == {("jobs", T0, 1.0), ("cpu_seconds", T0, 10.0)}
    st.forget(keys)
    assert st.close_ready()[0] == [] and not st.has_closed_windows()


def test_late_event_is_counted_not_added() -> None:
    st = PartitionState(DEFS)
    st.add(ev(1, T0 + 1_000), offset=0)
    st.add(ev(2, T0 + 120_000), offset=1)  # closes window 0
    rows, keys = st.close_ready()
    st.forget(keys)
    st.add(ev(3, T0 + 2_000), offset=2)  # late for window 0
    assert st.late_counts() == [("jobs", T0, 1), ("cpu_seconds", T0, 1)]
    st.clear_late()
    st.add(ev(4, T0 + 3_000), offset=3, count_late=False)  # re-read after a restart: neither added nor late
    assert st.late_counts() == []


def test_close_ready_is_non_destructive_until_forget() -> None:
    st = PartitionState(DEFS)
    st.add(ev(1, T0), offset=5)
    st.advance(T0 + 10 * 60_000)
    first, _ = st.close_ready()
    again, keys = st.close_ready()
    assert first == again and len(first) == 2
    assert st.first_open_offset() == 5
    assert st.first_open_offset(exclude=keys) is None


def test_groups_are_separate_windows() -> None:
    st = PartitionState(DEFS)
    for i, tenant in enumerate(["a", "b", "a"]):
        st.add(ev(i, T0 + i, tenant=tenant), offset=i)
    st.advance(T0 + 10 * 60_000)
    jobs = {r.group_key: r.value for r in st.close_ready()[0] if r.metric == "jobs"}
    assert jobs == {"a": 2.0, "b": 1.0}


def test_exact_sum_is_order_independent_and_equals_fsum() -> None:
    rng = random.Random(3)
    values = [rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-8, 8) for _ in range(2000)]
    agg = Sum()
    expected = math.fsum(values)
    for _ in range(3):
        rng.shuffle(values)
        state = agg.new()
        for v in values:
            state = agg.add(state, v)
        assert agg.result(state)[0] == expected == agg.exact(values)[0]


def test_window_start() -> None:
    assert window_start(T0 + 59_999, 60_000) == T0
    assert window_start(T0 + 60_000, 60_000) == T0 + 60_000


def test_quantiles_of_the_same_value_share_one_sketch_and_each_reads_its_own_q() -> None:
    import dataclasses

    defaults = load_definitions(Path(__file__).parents[1] / "batchmark" / "metrics.toml")
    # a fourth quantile with another k must keep a sketch of its own
    p90 = dataclasses.replace(defaults.metric("duration_p50"), name="duration_p90_k64", params={"q": 0.9, "k": 64})
    defs = dataclasses.replace(defaults, metrics=(*defaults.metrics, p90))
    st = PartitionState(defs)
    rng = random.Random(6)
    durations = [rng.lognormvariate(4, 1.2) for _ in range(5000)]
    for i, d in enumerate(durations):
        st.add(ev(i, T0 + i, dur=d), offset=i)
    slots = {ms.metric.name: next(iter(ms.windows.values())) for ms in st.metrics}
    shared = slots["duration_p50"][0]
    assert slots["duration_p95"][0] is shared and slots["duration_p99"][0] is shared
    assert slots["duration_p90_k64"][0] is not shared and slots["duration_p90_k64"][0].k == 64
    assert shared.n == 5000 and all(slots[m][1] == 5000 for m in ("duration_p50", "duration_p95", "duration_p99"))
    st.advance(T0 + 2 * 3_600_000)
    rows = {r.metric: r for r in st.close_ready()[0]}
    ordered = sorted(durations)
    for name in ("duration_p50", "duration_p95", "duration_p99", "duration_p90_k64"):
        agg = defs.metric(name).aggregate
        assert rows[name].n_events == 5000
        assert rows[name].value == shared.get_quantile(agg.q, True) or name == "duration_p90_k64"
        assert agg.error(rows[name].value, None, ordered) <= agg.bound(), name
    assert rows["duration_p50"].value < rows["duration_p95"].value < rows["duration_p99"].value
