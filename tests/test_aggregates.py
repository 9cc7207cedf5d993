"""Per kind: the stream's online form against the batch's offline form, on data with known properties.

These run the same core functions the Faust worker and the Spark job run, without the engines around them.
"""

from __future__ import annotations

import math
import random
import statistics
from itertools import permutations

import datasketches as ds
import numpy as np
import pytest

from batchmark.aggregates import BinPacking, DistinctCount, FirstFitBins, Quantile, TopK, first_fit, rank_error


def _online(agg, values):  # noqa: ANN001, ANN202
    state = agg.new()
    for v in values:
        state = agg.add(state, v)
    return agg.result(state), state


def test_hll_relative_error_over_100_windows_is_within_3_sigma() -> None:
    agg = DistinctCount({"lg_k": 8})  # m = 256: sigma = 1.04 / 16 = 6.5%
    sigma = 1.04 / math.sqrt(2**8)
    errors = []
    for w in range(120):
        n = 3000 + 37 * w
        values = [f"user-{w}-{i}" for i in range(n)] * 2  # every user twice: distinct count n
        (estimate, _), _ = _online(agg, values)
        assert agg.exact(values)[0] == n
        errors.append((estimate - n) / n)
    assert max(abs(e) for e in errors) <= 3 * sigma == agg.bound()
    rms = math.sqrt(statistics.fmean(e * e for e in errors))
    assert 0.4 * sigma < rms < 1.5 * sigma  # the sketch behaves as theory says, neither worse nor suspiciously exact


def test_kll_rank_error_within_its_normalized_bound() -> None:
    rng = np.random.default_rng(5)
    checks = within = 0
    for _ in range(100):
        data = rng.lognormal(4.0, 1.2, size=5000).round().tolist()
        truth = sorted(data)
        for q in (0.5, 0.95, 0.99):
            agg = Quantile({"q": q, "k": 200})
            (estimate, _), _ = _online(agg, data)
            err = agg.error(estimate, None, data)
            assert err == rank_error(estimate, truth, q)
            checks += 1
            within += err <= agg.bound()
    assert within / checks >= 0.97  # 99% confidence per query; 300 queries


def test_quantile_of_small_windows_is_exact() -> None:
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    for q, expected in ((0.5, 3.0), (0.95, 5.0), (0.2, 1.0)):
        agg = Quantile({"q": q})
        assert agg.exact(data)[0] == expected
        assert _online(agg, data)[0][0] == expected  # KLL keeps every item while n <= k


def test_topk_recall_is_1_on_a_strongly_skewed_stream() -> None:
    rng = np.random.default_rng(3)
    agg = TopK({"k": 5, "lg_max_map_size": 7})
    for _ in range(20):
        ranks = rng.zipf(1.6, size=50_000)
        values = [f"user-{r}" for r in ranks if r < 100_000]
        (value, detail), _ = _online(agg, values)
        figures = agg.recall(detail, values)
        assert figures["recall"] == 1.0
        assert agg.error(value, detail, values) == 0.0
        assert figures["count_error"] < 0.05


def test_topk_guaranteed_miss_rate_stays_zero_on_flat_data() -> None:
    """With little skew recall@k can drop, but never for the items theory guarantees to be found: sizes where
    the guarantee covers items (count above the (k+1)-th by more than twice the sketch's a-priori error)."""
    rng = random.Random(4)
    agg = TopK({"k": 5, "lg_max_map_size": 6})
    recalls = []
    for _ in range(20):
        values = [f"u{rng.randint(0, 300)}" for _ in range(20_000)]
        values += ["hot_a"] * 6000 + ["hot_b"] * 5000 + ["hot_c"] * 4500
        rng.shuffle(values)
        (value, detail), _ = _online(agg, values)
        figures = agg.recall(detail, values)
        assert figures["guaranteed"] == 3  # the three hot items; the flat ones (~66 each) are not guaranteed
        assert figures["guaranteed_miss_rate"] == agg.error(value, detail, values) == 0.0
        assert {"hot_a", "hot_b", "hot_c"} <= {item for item, _ in detail["items"]}
        recalls.append(figures["recall"])
    assert min(recalls) < 1.0  # the unguaranteed places of the top 5 are missed on flat data: the test can tell


def test_first_fit_online_within_1_7_of_ffd_and_above_the_lower_bound() -> None:
    rng = random.Random(9)
    agg = BinPacking({"capacity": 128.0})
    ratios = []
    for _ in range(300):
        items = [rng.choice([0.5, 1, 2, 4, 8, 16, 32, 64, 96]) * 1.0 for _ in range(rng.randint(5, 400))]
        (ff, _), _ = _online(agg, items)
        ffd, detail = agg.exact(items)
        assert ff >= detail["lower_bound"] and ffd >= detail["lower_bound"]
        assert agg.error(ff, None, items) == ff / ffd <= 1.7
        ratios.append(ff / ffd)
    assert max(ratios) > 1.0  # online does pay for not seeing the future on some windows


def _optimum(items: list[float], capacity: float) -> int:
    """Fewest bins, by exhaustive search (small instances only)."""
    best = len(items)
    for order in permutations(sorted(items, reverse=True)):
        best = min(best, first_fit(order, capacity))  # some order makes First Fit optimal
    return best


def test_ffd_is_optimal_where_theory_says_it_must_be() -> None:
    rng = random.Random(2)
    for _ in range(200):
        # every item above a third of the bin: at most two per bin, and FFD is optimal
        items = [float(rng.randint(34, 100)) for _ in range(rng.randint(2, 7))]
        assert first_fit(sorted(items, reverse=True), 100.0) == _optimum(items, 100.0)
        # everything fits in one bin
        small = [float(rng.randint(1, 14)) for _ in range(rng.randint(1, 7))]
        assert first_fit(sorted(small, reverse=True), 100.0) == 1 == _optimum(small, 100.0)


def test_ffd_respects_11_9_opt_plus_6_9() -> None:
    rng = random.Random(8)
    for _ in range(200):
        items = [float(rng.randint(1, 100)) for _ in range(rng.randint(2, 7))]
        assert first_fit(sorted(items, reverse=True), 100.0) <= 11 / 9 * _optimum(items, 100.0) + 6 / 9


def test_an_item_larger_than_a_bin_takes_bins_of_its_own() -> None:
    agg = BinPacking({"capacity": 10.0})
    (ff, _), state = _online(agg, [25.0, 3.0])
    assert ff == 3 and agg.exact([25.0, 3.0])[0] == 3


@pytest.mark.parametrize(
    ("agg", "cap"),
    [
        # HLL: at most its full register array, whatever the number of distinct keys
        (DistinctCount({"lg_k": 12}), ds.hll_sketch.get_max_updatable_serialization_bytes(12, ds.tgt_hll_type.HLL_8)),
        # frequent items: at most 0.75 * 2^lg_max_map_size active items (here about 20 bytes each, with counters)
        (TopK({"k": 5, "lg_max_map_size": 7}), int(0.75 * 2**7) * 40),
    ],
)
def test_sketch_memory_does_not_grow_with_distinct_keys(agg, cap: int) -> None:  # noqa: ANN001
    sizes = [agg.state_bytes(_online(agg, (f"user-{i}" for i in range(n)))[1]) for n in (1_000, 100_000, 1_000_000)]
    assert max(sizes) <= cap
    assert sizes[2] <= 2 * sizes[1] + 64  # 10x the keys, not 10x the memory


def test_kll_memory_grows_only_logarithmically() -> None:
    agg = Quantile({"q": 0.5, "k": 200})
    sizes = [agg.state_bytes(_online(agg, (float(i) for i in range(n)))[1]) for n in (10_000, 1_000_000)]
    assert sizes[1] < sizes[0] * 2.5  # 100x the items, not 100x the memory


def _first_fit_scan(bins: list[float], x: float, capacity: float) -> None:
    """The textbook First Fit: scan the bins in order (the reference for the tree)."""
    if x > capacity:
        full, x = divmod(x, capacity)
        bins.extend([0.0] * int(full))
        if x == 0:
            return
    for i, room in enumerate(bins):
        if room >= x:
            bins[i] = room - x
            return
    bins.append(capacity - x)


def test_first_fit_tree_chooses_the_same_bin_as_a_scan_after_every_item() -> None:
    rng = random.Random(4)
    for trial in range(600):
        capacity = rng.choice([10.0, 100.0, 128.0, 7.5])
        draw = [
            lambda: rng.choice([0, 0.5, 1, 2, 4, 8, 16, 32, 64, 96, 200]) * 1.0,  # sizes of the default domain
            lambda c=capacity: rng.uniform(0, c * 1.3),  # any size, some larger than a bin
            lambda: float(rng.randint(0, 30)),
        ][trial % 3]
        scan: list[float] = []
        tree = FirstFitBins(capacity)
        for _ in range(rng.randint(0, 600)):
            x = draw()
            _first_fit_scan(scan, x, capacity)
            tree.place(x)
            assert tree.rooms() == scan


def test_every_kind_reports_the_memory_of_its_state() -> None:
    """state_bytes works on each kind's own state and grows no faster than its theory says."""
    from batchmark.aggregates import AGGREGATES

    params = {"distinct": {"lg_k": 8}, "quantile": {"q": 0.5, "k": 50}, "topk": {"k": 3, "lg_max_map_size": 5},
              "binpack": {"capacity": 10.0}}  # fmt: skip
    for kind, cls in AGGREGATES.items():
        agg = cls(params.get(kind))
        state = agg.new()
        for i in range(1000):
            state = agg.add(state, f"k{i}" if agg.input == "field" else float(i % 7))
        got = agg.state_bytes(state)
        if kind == "binpack":  # one room per bin plus the max-tree over them: at most 4 slots per bin
            assert 8 * len(state) <= got <= 32 * len(state), (len(state), got)
        else:
            assert 0 < got <= (5000 if agg.probabilistic else 64), (kind, got)


def _random_windows(rng: random.Random, pool: list, max_windows: int = 12) -> tuple[list[list], np.ndarray]:
    windows = [[rng.choice(pool) for _ in range(rng.choice([1, 1, 2, 3, 7, 40, 300]))] for _ in range(max_windows)]
    bounds = np.concatenate([[0], np.cumsum([len(w) for w in windows])])
    return windows, bounds


@pytest.mark.parametrize(
    ("kind", "params", "pool"),
    [
        ("count", {}, [1.0]),
        ("sum", {}, [0.25, 1.5, 3.0, 1e6, 0.1, 1e-3, 7.0 / 3.0, 1e300, -1e300]),
        ("sum", {}, [0.25, 4.0, 16.0, 150.0, 0.5]),  # multiples of 0.25: the vectorized path
        ("mean", {}, [0.1, 0.2, 0.3, 1e16, 1.0]),
        ("min", {}, [3.0, -1.0, 2.5, 1e9]),
        ("max", {}, [3.0, -1.0, 2.5, 1e9]),
        ("distinct", {}, ["a", "b", "c", "user-1", "ä", "B"]),
        ("distinct", {}, [1.0, 2.0, 2.5, 10.0]),
        ("quantile", {"q": 0.5}, [1.0, 2.0, 3.0, 5.0, 8.0, 100.0]),
        ("quantile", {"q": 0.99}, [1.0, 2.0, 3.0, 5.0, 8.0, 100.0]),
        ("topk", {"k": 3}, ["u1", "u2", "u3", "u10", "u2b", "Z", "é"]),
        ("binpack", {"capacity": 128.0}, [0.5, 1.0, 4.0, 16.0, 64.0, 100.0, 128.0, 200.0, 300.0, 0.0]),
        ("binpack", {"capacity": 1.0}, [0.1, 0.2, 0.3, 0.7, 0.45]),
    ],
)
def test_exact_windows_equals_exact_of_each_window(kind: str, params: dict, pool: list) -> None:
    from batchmark.aggregates import aggregate_for

    agg = aggregate_for(kind, params)
    rng = random.Random(hash((kind, str(params))) % 1000)
    for _ in range(40):
        windows, bounds = _random_windows(rng, pool)
        if agg.sorted_input:
            windows = [sorted(w) for w in windows]
        values = np.array([v for w in windows for v in w], dtype=object if isinstance(pool[0], str) else None)
        got = agg.exact_windows(values, bounds)
        want = [agg.exact(w) for w in windows]
        assert [(repr(v), d) for v, d in got] == [(repr(v), d) for v, d in want]  # repr: bit for bit


def test_first_fit_decreasing_is_first_fit_on_sorted_items() -> None:
    from batchmark.aggregates import first_fit_decreasing

    rng = random.Random(3)
    for _ in range(3000):
        capacity = rng.choice([1.0, 10.0, 128.0, 0.3])
        pool = [rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 7.5, 64.0, 100.0, 129.0, 300.0]) for _ in range(5)]
        pool.append(rng.random() * capacity * 1.5)
        items = sorted((rng.choice(pool) for _ in range(rng.randrange(60))), reverse=True)
        assert first_fit_decreasing(items, capacity) == first_fit(items, capacity), (items, capacity)


@pytest.mark.parametrize("seed", range(3))
def test_first_fit_decreasing_with_long_runs_on_and_off_the_grid(seed: int) -> None:
    """Long runs of equal items: on a power-of-two grid a bin takes its share of a run in one step, off it
    item by item; both must be First Fit's count exactly."""
    from batchmark.aggregates import first_fit_decreasing

    rng = random.Random(seed)
    cases = [
        (64.0, [0.25, 0.5, 1.0, 2.0, 16.0, 48.0, 63.75, 64.0]),  # the grid (the default metric's sizes)
        (0.75, [0.25, 0.5, 0.125, 0.75]),
        (1.0, [0.1, 0.2, 0.3, 0.7, 0.35]),  # off the grid: rounding decides what fits
        (10.0, [3.3, 0.1, 6.7, 2.5, 0.0]),
        (2.0**60, [2.0**59, 3.0, 2.0**58 + 2.0**7]),  # a capacity beyond the grid's reach
    ]
    for capacity, pool in cases:
        for _ in range(40):
            sizes = rng.sample(pool, k=rng.randrange(1, len(pool) + 1))
            items = sorted((rng.choice(sizes) for _ in range(rng.randrange(1, 3000))), reverse=True)
            assert first_fit_decreasing(items, capacity) == first_fit(items, capacity), (capacity, sizes)
