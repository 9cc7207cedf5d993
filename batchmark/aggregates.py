"""Aggregations, each defined once with both an online form (the stream) and an offline form (the batch).

Every aggregate has:
- ``new()`` -> state, ``add(state, value)`` -> state, ``result(state)`` -> (value, detail): the stream's form;
- ``exact(values)`` -> (value, detail): the batch's form, with all of a window's values at hand;
- ``error(stream_value, stream_detail, truth_values)``: the kind's accuracy measure against the truth
  (smaller is better), and ``bound()``: its theoretical limit, the default tolerance;
- ``state_bytes(state)``: memory one window's state takes (sketches: their serialized size).

Exact kinds give bit-identical results online and offline on the same values (sums: Shewchuk partials online,
``math.fsum`` offline). Sketch kinds (HyperLogLog, KLL, frequent items; Apache DataSketches) and online First Fit
differ from their offline forms by an amount theory bounds; the nightly comparison measures it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import datasketches as ds

Detail = dict[str, Any] | None


def add_partial(partials: list[float], x: float) -> list[float]:
    """Add x to a list of non-overlapping partial sums exactly (Shewchuk; the algorithm behind math.fsum)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
    return partials


def rel_error(stream: float, truth: float) -> float:
    if stream == truth:
        return 0.0
    return math.inf if truth == 0 else abs(stream - truth) / abs(truth)


class Aggregate:
    """Base of all aggregates; subclasses set ``kind`` and what their input is."""

    kind: ClassVar[str]
    input: ClassVar[str] = "number"  # "number" (a value expression), "field" (any field's value) or "none"
    error_name: ClassVar[str] = "relative error"
    probabilistic: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = params or {}

    def new(self) -> Any:
        raise NotImplementedError

    def add(self, state: Any, value: Any) -> Any:
        raise NotImplementedError

    def result(self, state: Any) -> tuple[float, Detail]:
        raise NotImplementedError

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        raise NotImplementedError

    def error(self, stream_value: float, stream_detail: Detail, truth_values: Sequence[Any]) -> float:
        return rel_error(stream_value, self.exact(truth_values)[0])

    def bound(self) -> float:
        return 0.0

    def state_bytes(self, state: Any) -> int:
        return 8

    def in_place_update(self) -> Callable[[Any, Any], None] | None:
        """A function that folds a value into a state in place, with add's effect (the stream's fast path)."""
        return None

    def shared_state_key(self) -> tuple[Any, ...] | None:
        """Metrics of this kind over the same values may share one state when these keys are equal."""
        return None


class Count(Aggregate):
    kind = "count"
    input = "none"

    def new(self) -> int:
        return 0

    def add(self, state: int, value: Any) -> int:
        return state + 1

    def result(self, state: int) -> tuple[float, Detail]:
        return float(state), None

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        return float(len(values)), None


class Sum(Aggregate):
    kind = "sum"

    def new(self) -> list[float]:
        return []

    def add(self, state: list[float], value: float) -> list[float]:
        return add_partial(state, value)

    def result(self, state: list[float]) -> tuple[float, Detail]:
        return math.fsum(state), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return math.fsum(values), None

    def state_bytes(self, state: list[float]) -> int:
        return 8 * max(1, len(state))


class Mean(Aggregate):
    kind = "mean"

    def new(self) -> list[Any]:
        return [0, []]

    def add(self, state: list[Any], value: float) -> list[Any]:
        state[0] += 1
        add_partial(state[1], value)
        return state

    def result(self, state: list[Any]) -> tuple[float, Detail]:
        return (math.fsum(state[1]) / state[0] if state[0] else math.nan), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return (math.fsum(values) / len(values) if len(values) else math.nan), None

    def state_bytes(self, state: list[Any]) -> int:
        return 8 + 8 * max(1, len(state[1]))


class Min(Aggregate):
    kind = "min"

    def new(self) -> float:
        return math.inf

    def add(self, state: float, value: float) -> float:
        return value if value < state else state

    def result(self, state: float) -> tuple[float, Detail]:
        return state, None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return float(min(values)), None


class Max(Aggregate):
    kind = "max"

    def new(self) -> float:
        return -math.inf

    def add(self, state: float, value: float) -> float:
        return value if value > state else state

    def result(self, state: float) -> tuple[float, Detail]:
        return state, None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return float(max(values)), None


class DistinctCount(Aggregate):
    """HyperLogLog (lg_k) online; the exact number of distinct values offline."""

    kind = "distinct"
    input = "field"
    probabilistic = True

    @property
    def lg_k(self) -> int:
        return int(self.params.get("lg_k", 12))

    def new(self) -> Any:
        return ds.hll_sketch(self.lg_k)

    def add(self, state: Any, value: Any) -> Any:
        state.update(str(value))
        return state

    def result(self, state: Any) -> tuple[float, Detail]:
        return float(state.get_estimate()), None

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        return float(len({str(v) for v in values})), None

    def bound(self) -> float:
        """Three standard errors of HLL: 3 x 1.04 / sqrt(2^lg_k)."""
        return 3 * 1.04 / math.sqrt(2**self.lg_k)

    def state_bytes(self, state: Any) -> int:
        return state.get_updatable_serialization_bytes()


def _inverted_cdf_quantile(sorted_values: Sequence[float], q: float) -> float:
    n = len(sorted_values)
    return float(sorted_values[min(n - 1, max(0, math.ceil(q * n) - 1))])


def rank_error(estimate: float, sorted_values: Sequence[float], q: float) -> float:
    """How far q lies from the normalized rank interval of `estimate` in the data (0 when inside)."""
    n = len(sorted_values)
    lo = bisect.bisect_left(sorted_values, estimate) / n
    hi = bisect.bisect_right(sorted_values, estimate) / n
    return 0.0 if lo <= q <= hi else min(abs(q - lo), abs(q - hi))


class Quantile(Aggregate):
    """A KLL sketch (k) online; the exact q-quantile (inverted CDF) offline. Accuracy is the rank error."""

    kind = "quantile"
    error_name = "rank error"
    probabilistic = True

    @property
    def q(self) -> float:
        return float(self.params["q"])

    @property
    def k(self) -> int:
        return int(self.params.get("k", 200))

    def new(self) -> Any:
        return ds.kll_doubles_sketch(self.k)

    def add(self, state: Any, value: float) -> Any:
        state.update(value)
        return state

    def in_place_update(self) -> Callable[[Any, Any], None] | None:
        return ds.kll_doubles_sketch.update

    def shared_state_key(self) -> tuple[Any, ...] | None:
        return ("kll", self.k)  # one sketch answers every quantile: only q differs between such metrics

    def result(self, state: Any) -> tuple[float, Detail]:
        return float(state.get_quantile(self.q, True)), None  # inclusive: the same definition as exact()

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return _inverted_cdf_quantile(sorted(values), self.q), None

    def error(self, stream_value: float, stream_detail: Detail, truth_values: Sequence[float]) -> float:
        return rank_error(stream_value, sorted(truth_values), self.q)

    def bound(self) -> float:
        """KLL's normalized rank error for a single quantile at this k (99% confidence)."""
        return ds.kll_doubles_sketch.get_normalized_rank_error(self.k, False)

    def state_bytes(self, state: Any) -> int:
        return len(state.serialize())


class TopK(Aggregate):
    """A frequent-items sketch online; the exact top-k offline. Accuracy is recall@k.

    ``error`` is 1 - recall over the true top-k items that theory guarantees the sketch finds: those whose
    count exceeds the (k+1)-th count by more than twice the sketch's a-priori error. Plain recall@k and the
    count error of the found items are in the detail.
    """

    kind = "topk"
    input = "field"
    error_name = "1 - recall@k (guaranteed items)"  # a deterministic guarantee: mostly defaults to 1.0

    @property
    def k(self) -> int:
        return int(self.params.get("k", 5))

    @property
    def lg_max_map_size(self) -> int:
        return int(self.params.get("lg_max_map_size", 7))

    def new(self) -> Any:
        return ds.frequent_strings_sketch(self.lg_max_map_size)

    def add(self, state: Any, value: Any) -> Any:
        state.update(str(value), 1)
        return state

    def result(self, state: Any) -> tuple[float, Detail]:
        items = state.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)
        top = sorted(((i[0], int(i[1])) for i in items), key=lambda t: (-t[1], t[0]))[: self.k]
        return float(top[0][1] if top else 0), {"items": [list(t) for t in top]}

    @staticmethod
    def _exact_top(values: Sequence[Any], k: int) -> list[tuple[str, int]]:
        counts = Counter(str(v) for v in values)
        return sorted(counts.items(), key=lambda t: (-t[1], t[0]))[: k + 1]

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        top = self._exact_top(values, self.k)[: self.k]
        return float(top[0][1] if top else 0), {"items": [list(t) for t in top]}

    def error(self, stream_value: float, stream_detail: Detail, truth_values: Sequence[Any]) -> float:
        return self.recall(stream_detail, truth_values)["guaranteed_miss_rate"]

    def recall(self, stream_detail: Detail, truth_values: Sequence[Any]) -> dict[str, float]:
        """recall@k, the miss rate over guaranteed items, and the largest relative count error of found items."""
        top = self._exact_top(truth_values, self.k)
        true_k, next_count = top[: self.k], (top[self.k][1] if len(top) > self.k else 0)
        found = {item: est for item, est in (stream_detail or {}).get("items", [])}
        eps = ds.frequent_strings_sketch.get_apriori_error(self.lg_max_map_size, len(truth_values))
        guaranteed = [item for item, c in true_k if c - next_count > 2 * eps]
        hits = sum(1 for item, _ in true_k if item in found)
        miss = sum(1 for item in guaranteed if item not in found)
        count_err = max((abs(found[i] - c) / c for i, c in true_k if i in found), default=0.0)
        return {
            "recall": hits / len(true_k) if true_k else 1.0,
            "guaranteed_miss_rate": miss / len(guaranteed) if guaranteed else 0.0,
            "count_error": count_err,
        }

    def state_bytes(self, state: Any) -> int:
        return state.get_serialized_size_bytes()


class FirstFitBins:
    """Bins in opening order with the room each has left, and a max-tree over the rooms.

    First Fit puts an item into the first bin with room for it; the tree finds that bin in O(log bins)
    instead of scanning every bin (the scan was a quarter of the stream worker's time with a few hundred
    bins per window). Same bins, same choices, same float arithmetic as the scan.
    """

    __slots__ = ("capacity", "n", "size", "tree")

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.n = 0  # bins opened
        self.size = 8  # leaves; doubles when full
        self.tree = [-1.0] * 16  # tree[1] is the root, leaves at size..2*size-1; -1: no bin there

    def __len__(self) -> int:
        return self.n

    def rooms(self) -> list[float]:
        """Room left in each bin, in opening order."""
        return self.tree[self.size : self.size + self.n]

    def _open(self, room: float) -> None:
        if self.n == self.size:  # grow: rebuild a tree twice as wide
            leaves = self.rooms()
            self.size *= 2
            self.tree = [-1.0] * (2 * self.size)
            self.tree[self.size : self.size + len(leaves)] = leaves
            for i in range(self.size - 1, 0, -1):
                left, right = self.tree[2 * i], self.tree[2 * i + 1]
                self.tree[i] = left if left > right else right
        tree = self.tree
        i = self.size + self.n
        self.n += 1
        tree[i] = room
        i >>= 1
        while i and tree[i] < room:
            tree[i] = room
            i >>= 1

    def place(self, x: float) -> None:
        """Put x into the first bin with room (an item larger than a bin fills bins of its own first)."""
        capacity = self.capacity
        if x > capacity:
            full, x = divmod(x, capacity)
            for _ in range(int(full)):
                self._open(0.0)
            if x == 0:
                return
        tree = self.tree
        if tree[1] < x:
            self._open(capacity - x)
            return
        i, size = 1, self.size
        while i < size:  # go down to the leftmost leaf with room >= x
            i <<= 1
            if tree[i] < x:
                i += 1
        tree[i] -= x
        i >>= 1
        while i:  # rooms only shrink here: stop where a maximum no longer changes
            left, right = tree[2 * i], tree[2 * i + 1]
            top = left if left > right else right
            if tree[i] == top:
                break
            tree[i] = top
            i >>= 1


def first_fit(items: Sequence[float], capacity: float) -> int:
    """Bins First Fit uses for items in this order (an item larger than a bin gets bins of its own)."""
    bins = FirstFitBins(capacity)
    for x in items:
        bins.place(x)
    return len(bins)


class BinPacking(Aggregate):
    """Online First Fit as items arrive; offline First Fit Decreasing, with the lower bound ceil(sum/capacity).

    Accuracy is the competitive ratio FF/FFD: theory bounds FF by 1.7 OPT and FFD >= OPT, so FF/FFD <= 1.7.
    """

    kind = "binpack"
    error_name = "FF / FFD"

    @property
    def capacity(self) -> float:
        return float(self.params["capacity"])

    def new(self) -> FirstFitBins:
        return FirstFitBins(self.capacity)

    def add(self, state: FirstFitBins, value: float) -> FirstFitBins:
        state.place(value)
        return state

    def in_place_update(self) -> Callable[[Any, Any], None] | None:
        return FirstFitBins.place

    def result(self, state: FirstFitBins) -> tuple[float, Detail]:
        return float(len(state)), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        ffd = first_fit(sorted(values, reverse=True), self.capacity)
        lower = math.ceil(math.fsum(values) / self.capacity - 1e-9)
        return float(ffd), {"lower_bound": lower}

    def error(self, stream_value: float, stream_detail: Detail, truth_values: Sequence[float]) -> float:
        ffd = self.exact(truth_values)[0]
        return stream_value / ffd if ffd else (0.0 if stream_value == 0 else math.inf)

    def bound(self) -> float:
        return 1.7

    def state_bytes(self, state: FirstFitBins) -> int:
        return 8 * len(state.tree)


AGGREGATES: dict[str, type[Aggregate]] = {
    cls.kind: cls for cls in (Count, Sum, Mean, Min, Max, DistinctCount, Quantile, TopK, BinPacking)
}


def aggregate_for(kind: str, params: dict[str, Any] | None = None) -> Aggregate:
    """The aggregate implementing a metric kind."""
    return AGGREGATES[kind](params)
