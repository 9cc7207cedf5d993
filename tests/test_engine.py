"""Stream-side windows: watermark, lateness, closing, and non-destructive checkpoints."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

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


def _state_view(st: PartitionState, sketchy: set[str]) -> tuple:
    """Everything a checkpoint reads from a state; a KLL's value only by its count (its compactions are random)."""
    rows, _ = st.close_ready()
    results = sorted(
        (r.metric, r.group_key, r.window_start_ms, r.window_end_ms, r.n_events)
        + (() if r.metric in sketchy else (r.value, repr(r.detail)))
        for r in rows
    )
    return results, sorted(st.late_counts()), st.first_open_offset(), st.watermark_ms, st.late_events


@pytest.mark.parametrize("which", ["default", "nulls", "new_york"])
def test_add_batch_is_add_one_event_at_a_time(which: str, tmp_path: Path) -> None:
    """The worker's batched fold against the per-event definition: batches of 1 to 400 events, out of order,
    late, re-read (count_late=False), with punctuations and checkpoints (close, forget) between batches. Every
    window's value (bit for bit, sketches included but KLL), its count, the late counts, the resume offset and
    the watermark before each event must be the same."""
    from tests.test_custom_dataset import NULLS_DEFS
    from tests.test_timezone import DEFS as NY_DEFS

    rng = random.Random(which)
    if which == "default":
        defs = load_definitions(Path(__file__).parents[1] / "batchmark" / "metrics.toml")

        def make(i: int, t: int) -> dict:
            return {"event_id": f"e{i}", "event_time_ms": t, "tenant": f"t{rng.randrange(4)}",
                    "user": f"u{rng.randrange(50)}", "job_id": f"j{i}", "cpu": rng.randrange(1, 64) / 4,
                    "mem_gb": rng.choice([0.5, 3.0, 48.0, 127.9, 300.0]), "duration_s": rng.random() * 1e4}  # fmt: skip
    else:
        (tmp_path / "d.toml").write_text(NULLS_DEFS if which == "nulls" else NY_DEFS)
        defs = load_definitions(tmp_path / "d.toml")

        def make(i: int, t: int) -> dict:
            if which == "nulls":
                return {"row_id": f"r{i}", "event_time_ms": t, "key": f"k{rng.randrange(3)}",
                        "s": rng.choice([None, "a", "b"]), "f": rng.choice([None, 1.5, 99.0, 0.1 * i % 100]),
                        "i": rng.choice([None, 0, 7, i % 1000])}  # fmt: skip
            return {"event_id": f"e{i}", "event_time_ms": t, "key": f"k{rng.randrange(3)}", "x": rng.randrange(99) / 8}

    sketchy = {m.name for m in defs.metrics if m.kind == "quantile"}
    n, t = 6000, 1_795_478_400_000 - 7_200_000
    events = []
    for i in range(n):
        t += rng.randrange(0, 4) * 1_250  # on a grid: some events meet a window exactly as it closes
        late = rng.random() < 0.05
        back = rng.randrange(80, 4_000) if late else rng.randrange(0, 16)
        events.append(make(i, t - back * 1_250 - (rng.randrange(1_250) if rng.random() < 0.2 else 0)))
    one, many = PartitionState(defs), PartitionState(defs)
    pos = compared = 0
    while pos < n:
        size = rng.choice([1, 2, 3, 17, 60, 400])
        batch = events[pos : pos + size]
        offsets = list(range(pos, pos + len(batch)))
        count_late = pos >= 300  # the first ones as if re-read after a restart
        marks = []
        for e, o in zip(batch, offsets, strict=True):
            marks.append(one.watermark_ms)
            one.add(e, o, count_late=count_late)
        assert many.add_batch(batch, offsets, count_late=count_late) == marks
        pos += len(batch)
        if rng.random() < 0.05:
            mark = max(e["event_time_ms"] for e in batch) + rng.randrange(0, 200_000)
            one.advance(mark)
            many.advance(mark)
        if rng.random() < 0.3 or pos >= n:
            view = _state_view(one, sketchy)
            assert _state_view(many, sketchy) == view
            compared += len(view[0])
            for st in (one, many):
                st.forget(st.close_ready()[1])
                st.clear_late()
    one.advance(t + 10**9)
    many.advance(t + 10**9)
    final = _state_view(one, sketchy)
    assert _state_view(many, sketchy) == final
    assert compared + len(final[0]) > 100 and one.late_events > 50


@pytest.mark.parametrize("kind", ["count", "sum", "mean", "min", "max", "distinct", "topk", "binpack"])
def test_add_many_is_add_value_by_value(kind: str) -> None:
    """Each kind's bulk fold against folding one value at a time, on values that defeat shortcuts: sums whose
    float total is not exact (the partials must stay exact), NaN first for min/max, items larger than a bin."""
    from batchmark.aggregates import aggregate_for

    params = {"binpack": {"capacity": 10.0}, "topk": {"k": 3}}.get(kind, {})
    agg = aggregate_for(kind, params)
    rng = random.Random(kind)
    for trial in range(300):
        pools = [[1e16, 1.0, -1e16, 3.3, 1e-300], [0.1, 0.2, 0.3, 2.5], [math.nan, 1.0, -0.0, 0.0, 7.0],
                 [2**53 + 1, 2**60 + 3, 0.5, 7, -(2**55) - 1]]  # fmt: skip
        pool = pools[trial % 4]
        if kind in ("distinct", "topk"):
            pool = ["a", "b", "c", "d", 1, 2.0]
        if kind == "binpack":
            pool = [0.5, 3.3, 9.9, 10.0, 25.0, 0.1]
        one, many = agg.new(), agg.new()
        for _ in range(rng.randrange(1, 4)):
            values = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
            for v in values:
                one = agg.add(one, v)
            many = agg.add_many(many, values if trial % 2 else tuple(values))
        got, want = agg.result(many), agg.result(one)
        assert repr(got) == repr(want), (values, got, want)
