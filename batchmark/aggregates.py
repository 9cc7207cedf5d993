"""Aggregations, each defined once with both an online form (the stream) and an offline form (the batch).

Every aggregate has:
- ``new()`` -> state, ``add(state, value)`` -> state, ``result(state)`` -> (value, detail): the stream's form;
- ``exact(values)`` -> (value, detail): the batch's form, with all of a window's values at hand;
- ``error(stream_value, stream_detail, truth_values)``: the kind's accuracy measure against the truth
  (smaller is better), and ``bound()``: its theoretical limit, the default tolerance;
- ``state_bytes(state)``: memory one window's state takes (sketches: their serialized size);
- ``exact_windows(values, bounds)``: ``exact`` of many windows at once (the batch's fast path: vectorized where
  the kind allows, always equal to ``exact`` of each window), and ``accuracy(...)``: ``error`` with the
  kind's extra figures, from the window's exact result already computed.

Exact kinds give bit-identical results online and offline on the same values (sums: Shewchuk partials online,
``math.fsum`` offline). Sketch kinds (HyperLogLog, KLL, frequent items; Apache DataSketches) and online First Fit
differ from their offline forms by an amount theory bounds; the nightly comparison measures it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import datasketches as ds
import numpy as np
import pandas as pd

Detail = dict[str, Any] | None


@dataclass(frozen=True)
class Param:
    """A parameter a kind takes from its ``[[metric]]`` entry, with the values it accepts."""

    type: type[int] | type[float]
    required: bool = False
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    example: str = ""

    def check(self, value: Any) -> str | None:
        """Why `value` is refused (what to write instead), or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if self.type is int and not float(value).is_integer():
            return "must be a whole number"
        lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        hi_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if lo_bad or hi_bad:
            return f"must be {self.range_text()}" + (f", e.g. {self.example}" if self.example else "")
        return None

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        if self.low is not None:
            return "a positive number" if self.low == 0 and self.low_open else f"at least {self.low:g}"
        return f"at most {self.high:g}" if self.high is not None else "a number"


# The SQL of an error: quality.comparison (storage) writes each kind's expression over the window's truth row
# `t`, stream row `s` and the batch's accuracy row `a` (quality.window_accuracy). GX checks that column.
RELATIVE_ERROR_SQL = (
    "CASE WHEN s.value = t.value THEN 0.0 WHEN t.value = 0 THEN 'Infinity'::double precision "
    "ELSE abs(s.value - t.value) / abs(t.value) END"
)
# kinds whose error needs the whole window (ranks, recall): the batch computed it; it holds while the stream's
# value is the one the batch judged
BATCH_ERROR_SQL = (
    "CASE WHEN a.stream_value IS NOT DISTINCT FROM s.value THEN a.error ELSE 'Infinity'::double precision END"
)


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


def add_partials(partials: list[float], values: Sequence[float]) -> list[float]:
    """Add every value to the partial sums exactly: one add when math.fsum of the values is itself exact (the
    sum of the values minus it is 0), which leaves the exact total, and so fsum of the partials, unchanged.
    Only for floats: fsum rounds an int beyond 2^53 first, while add_partial keeps it exact."""
    exact = False
    if set(map(type, values)) == {float}:
        try:
            total = math.fsum(values)
            exact = math.isfinite(total) and math.fsum([*values, -total]) == 0.0
        except (OverflowError, ValueError):
            pass
    if exact:
        return add_partial(partials, total)
    for x in values:
        add_partial(partials, x)
    return partials


def grid_exponent(values: np.ndarray) -> int | None:
    """The largest p such that every (finite) value is a multiple of 2^p; None when every value is zero."""
    mantissa, exponent = np.frexp(values)
    ints = (mantissa * 2.0**53).astype(np.int64)
    nz = ints != 0
    if not nz.any():
        return None
    low = ints[nz] & -ints[nz]  # lowest set bit of each mantissa
    return int((exponent[nz] - 53 + np.log2(low).astype(np.int64)).min())


def exact_sums(values: np.ndarray, bounds: np.ndarray) -> list[float]:
    """math.fsum of each window values[bounds[i]:bounds[i+1]], bit for bit, vectorized where that is exact.

    When every value is a multiple of one power of two 2^p and the total of their magnitudes stays below
    2^53 * 2^p, every partial sum is representable, so float addition in any order is exact and equals fsum
    (the default metrics: cpu * duration_s is a multiple of 0.25). Otherwise fsum runs per window.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) and np.isfinite(values).all():
        lowest = grid_exponent(values)
        total = float(np.abs(values).sum()) * (1 + len(values) * 2.0**-52)  # >= the exact total
        if lowest is None or total < math.ldexp(1.0, 53 + lowest):
            return np.add.reduceat(values, bounds[:-1]).tolist() if len(bounds) > 1 else []
    flat = values.tolist()
    return [math.fsum(flat[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]


def rel_error(stream: float, truth: float) -> float:
    if stream == truth:
        return 0.0
    return math.inf if truth == 0 else abs(stream - truth) / abs(truth)


class Aggregate:
    """Base of all aggregates; subclasses set ``kind`` and what their input is."""

    kind: ClassVar[str]
    input: ClassVar[str] = "number"  # "number" (a value expression), "field" (any field's value) or "none"
    params_spec: ClassVar[dict[str, Param]] = {}  # the parameters the kind takes (definitions check them)
    error_name: ClassVar[str] = "relative error"
    error_sql: ClassVar[str] = RELATIVE_ERROR_SQL  # the error per window in SQL (see RELATIVE_ERROR_SQL)
    # a stream value no correct run can give, in SQL over the view's stream_value and batch_value (or None)
    impossible_sql: ClassVar[str | None] = None
    advice: ClassVar[str | None] = None  # what to do when its error is over tolerance ({metric} is replaced)
    probabilistic: ClassVar[bool] = False
    defined_on_empty: ClassVar[bool] = True  # False: the value of no values is undefined (None), e.g. a mean
    sorted_input: ClassVar[bool] = False  # exact_windows and accuracy get each window's values sorted

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

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        """``exact`` of every window: window i is values[bounds[i]:bounds[i+1]] (never empty; sorted within a
        window when ``sorted_input``). With `labels`, values are codes: value i is labels[values[i]] (a field's
        texts, sorted, coded once per frame). Kinds override this with a vectorized form; tests hold it to
        ``exact``."""
        flat = (labels[values] if labels is not None else values).tolist()
        return [self.exact(flat[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]

    def error(self, stream_value: float, stream_detail: Detail, truth_values: Sequence[Any]) -> float:
        values = sorted(truth_values) if self.sorted_input else truth_values
        return self.accuracy(stream_value, stream_detail, values, self.exact(values), values)[0]

    def accuracy(
        self,
        stream_value: float,
        stream_detail: Detail,
        truth: Sequence[Any],
        exact: tuple[float, Detail],
        seen: Sequence[Any],
    ) -> tuple[float, dict[str, Any]]:
        """The error of one window's stream value and the kind's extra figures (the report's detail).

        truth: the window's truth values, `exact` their exact(); seen: the values the stream counted (both
        sorted when ``sorted_input``)."""
        return rel_error(stream_value, exact[0]), {}

    def bound(self) -> float:
        return 0.0

    def state_bytes(self, state: Any) -> int:
        return 8

    def in_place_update(self) -> Callable[[Any, Any], None] | None:
        """A function that folds a value into a state in place, with add's effect (the stream's fast path)."""
        return None

    def add_many(self, state: Any, values: Sequence[Any]) -> Any:
        """Fold values in order, with the effect of ``add`` on each (the stream folds a window's share of a
        fetched batch at once). Kinds override it where one call can do the work; tests hold it to ``add``."""
        update = self.in_place_update()
        if update is not None:
            for v in values:
                update(state, v)
            return state
        add = self.add
        for v in values:
            state = add(state, v)
        return state

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

    def add_many(self, state: int, values: Sequence[Any]) -> int:
        return state + len(values)

    def result(self, state: int) -> tuple[float, Detail]:
        return float(state), None

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        return float(len(values)), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        return [(float(n), None) for n in np.diff(bounds).tolist()]


class Sum(Aggregate):
    kind = "sum"

    def new(self) -> list[float]:
        return []

    def add(self, state: list[float], value: float) -> list[float]:
        return add_partial(state, value)

    def add_many(self, state: list[float], values: Sequence[float]) -> list[float]:
        return add_partials(state, values)

    def result(self, state: list[float]) -> tuple[float, Detail]:
        return math.fsum(state), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return math.fsum(values), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        return [(v, None) for v in exact_sums(values, bounds)]

    def state_bytes(self, state: list[float]) -> int:
        return 8 * max(1, len(state))


class Mean(Aggregate):
    kind = "mean"
    defined_on_empty = False

    def new(self) -> list[Any]:
        return [0, []]

    def add(self, state: list[Any], value: float) -> list[Any]:
        state[0] += 1
        add_partial(state[1], value)
        return state

    def add_many(self, state: list[Any], values: Sequence[float]) -> list[Any]:
        state[0] += len(values)
        add_partials(state[1], values)
        return state

    def result(self, state: list[Any]) -> tuple[float, Detail]:
        return (math.fsum(state[1]) / state[0] if state[0] else math.nan), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return (math.fsum(values) / len(values) if len(values) else math.nan), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        return [(t / n, None) for t, n in zip(exact_sums(values, bounds), np.diff(bounds).tolist(), strict=True)]

    def state_bytes(self, state: list[Any]) -> int:
        return 8 + 8 * max(1, len(state[1]))


class Min(Aggregate):
    kind = "min"
    defined_on_empty = False

    def new(self) -> float:
        return math.inf

    def add(self, state: float, value: float) -> float:
        return value if value < state else state

    def add_many(self, state: float, values: Sequence[float]) -> float:
        low = min(values)  # the same fold as add's, unless the first value is a NaN, which add skips
        if low != low:
            return super().add_many(state, values)
        return low if low < state else state

    def result(self, state: float) -> tuple[float, Detail]:
        return state, None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return float(min(values)), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        return [(v, None) for v in np.minimum.reduceat(np.asarray(values, np.float64), bounds[:-1]).tolist()]


class Max(Aggregate):
    kind = "max"
    defined_on_empty = False

    def new(self) -> float:
        return -math.inf

    def add(self, state: float, value: float) -> float:
        return value if value > state else state

    def add_many(self, state: float, values: Sequence[float]) -> float:
        high = max(values)
        if high != high:
            return super().add_many(state, values)
        return high if high > state else state

    def result(self, state: float) -> tuple[float, Detail]:
        return state, None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return float(max(values)), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        return [(v, None) for v in np.maximum.reduceat(np.asarray(values, np.float64), bounds[:-1]).tolist()]


class DistinctCount(Aggregate):
    """HyperLogLog (lg_k) online; the exact number of distinct values offline."""

    kind = "distinct"
    input = "field"
    probabilistic = True
    params_spec = {"lg_k": Param(int, low=4, high=21)}
    advice = "enlarge the sketch of {metric} (lg_k in the definitions; each step halves the bound's square)."

    @property
    def lg_k(self) -> int:
        return int(self.params.get("lg_k", 12))

    def new(self) -> Any:
        return ds.hll_sketch(self.lg_k)

    def add(self, state: Any, value: Any) -> Any:
        state.update(str(value))
        return state

    def add_many(self, state: Any, values: Sequence[Any]) -> Any:
        update = state.update
        for v in values:
            update(v if type(v) is str else str(v))
        return state

    def result(self, state: Any) -> tuple[float, Detail]:
        return float(state.get_estimate()), None

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        return float(len({str(v) for v in values})), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        codes, uniques = (values, labels) if labels is not None else text_codes(values)
        window = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
        pairs, _ = window_value_counts(window, codes, len(bounds) - 1, len(uniques) + 1)
        counts = np.bincount(pairs // (len(uniques) + 1), minlength=len(bounds) - 1)
        return [(float(n), None) for n in counts.tolist()]

    def bound(self) -> float:
        """Three standard errors of HLL: 3 x 1.04 / sqrt(2^lg_k)."""
        return 3 * 1.04 / math.sqrt(2**self.lg_k)

    def state_bytes(self, state: Any) -> int:
        return state.get_updatable_serialization_bytes()


def window_value_counts(
    window: np.ndarray, codes: np.ndarray, windows: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (window, code) pairs as window * width + code, ascending, and how often each occurs: what
    np.unique(..., return_counts=True) gives, by counting in a table when the table is small (no sort)."""
    combined = window * width + codes
    if windows * width <= max(1 << 22, 4 * len(combined)) and (not len(codes) or codes.min() >= 0):
        counts = np.bincount(combined, minlength=windows * width)
        pairs = np.flatnonzero(counts)
        return pairs, counts[pairs]
    return np.unique(combined, return_counts=True)


def text_codes(values: np.ndarray, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of str(value) for each value (equal text, equal code), and the texts; sorted texts when
    `sort` (Python's string order): what field kinds' ``exact_windows`` take as values and labels."""
    arr = np.asarray(values)
    if arr.dtype != object or not all(type(v) is str for v in arr[: min(len(arr), 64)].tolist()):
        arr = np.array([str(v) for v in arr.tolist()], dtype=object)
    codes, uniques = pd.factorize(arr, sort=sort)
    if len(uniques) and sort:  # factorize sorts with numpy; keep Python's str order whatever it did
        order = sorted(range(len(uniques)), key=lambda i: uniques[i])
        if order != list(range(len(uniques))):
            rank = np.empty(len(order), np.int64)
            rank[order] = np.arange(len(order))
            codes, uniques = rank[codes], np.asarray(uniques, dtype=object)[order]
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


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
    error_sql = BATCH_ERROR_SQL
    probabilistic = True
    defined_on_empty = False
    sorted_input = True
    params_spec = {
        "q": Param(float, required=True, low=0, high=1, low_open=True, high_open=True, example="0.95"),
        "k": Param(int, low=8, high=65535),
    }
    advice = "enlarge the sketch of {metric} (k in the definitions: the rank error falls as 1/k)."

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

    def add_many(self, state: Any, values: Sequence[float]) -> Any:
        if len(values) < 16:
            return super().add_many(state, values)
        state.update(np.asarray(values, dtype=np.float64))  # the sketch's own loop over the array, in C++
        return state

    def shared_state_key(self) -> tuple[Any, ...] | None:
        return ("kll", self.k)  # one sketch answers every quantile: only q differs between such metrics

    def result(self, state: Any) -> tuple[float, Detail]:
        return float(state.get_quantile(self.q, True)), None  # inclusive: the same definition as exact()

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        return _inverted_cdf_quantile(sorted(values), self.q), None

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        n = np.diff(bounds)
        at = bounds[:-1] + np.minimum(n - 1, np.maximum(0, np.ceil(self.q * n).astype(np.int64) - 1))
        return [(v, None) for v in np.asarray(values, np.float64)[at].tolist()]

    def accuracy(
        self,
        stream_value: float,
        stream_detail: Detail,
        truth: Sequence[Any],
        exact: tuple[float, Detail],
        seen: Sequence[Any],
    ) -> tuple[float, dict[str, Any]]:
        extra = {"sketch_rank_error": rank_error(stream_value, seen, self.q)} if len(seen) else {}
        return rank_error(stream_value, truth, self.q), extra

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
    error_sql = BATCH_ERROR_SQL
    params_spec = {"k": Param(int, low=1), "lg_max_map_size": Param(int, low=3, high=20)}
    advice = "enlarge the sketch of {metric} (lg_max_map_size in the definitions, or a smaller k)."

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

    def add_many(self, state: Any, values: Sequence[Any]) -> Any:
        update = state.update
        for v in values:
            update(v if type(v) is str else str(v), 1)
        return state

    def result(self, state: Any) -> tuple[float, Detail]:
        items = state.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)
        top = sorted(((i[0], int(i[1])) for i in items), key=lambda t: (-t[1], t[0]))[: self.k]
        return float(top[0][1] if top else 0), {"items": [list(t) for t in top]}

    @staticmethod
    def _exact_top(values: Sequence[Any], k: int) -> list[tuple[str, int]]:
        """The k+1 most frequent texts with their counts (count descending, then text)."""
        if isinstance(values, np.ndarray) and pd.api.types.infer_dtype(values, skipna=False) == "string":
            # a window's texts (every value a str, so equal values are equal texts): counted in C
            found = pd.Series(values, dtype=object).value_counts(sort=False, dropna=False)
            counts = dict(zip(found.index.tolist(), found.tolist(), strict=True))
        else:
            counts = Counter(str(v) for v in values)
        return sorted(counts.items(), key=lambda t: (-t[1], t[0]))[: k + 1]

    def exact(self, values: Sequence[Any]) -> tuple[float, Detail]:
        top = self._exact_top(values, self.k)[: self.k]
        return float(top[0][1] if top else 0), {"items": [list(t) for t in top]}

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        codes, uniques = (values, labels) if labels is not None else text_codes(values, sort=True)
        width = len(uniques) + 1
        window = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
        pairs, counts = window_value_counts(window, codes, len(bounds) - 1, width)
        win, code = pairs // width, pairs % width
        order = np.lexsort((code, -counts, win))  # per window: count descending, then the item's text
        win, code, counts = win[order], code[order], counts[order]
        first = np.searchsorted(win, win, side="left")
        keep = np.flatnonzero(np.arange(len(win)) - first < self.k)
        items: list[list[list[Any]]] = [[] for _ in range(len(bounds) - 1)]
        for w, c, n in zip(win[keep].tolist(), code[keep].tolist(), counts[keep].tolist(), strict=True):
            items[w].append([uniques[c], n])
        return [(float(top[0][1] if top else 0), {"items": top}) for top in items]

    def accuracy(
        self,
        stream_value: float,
        stream_detail: Detail,
        truth: Sequence[Any],
        exact: tuple[float, Detail],
        seen: Sequence[Any],
    ) -> tuple[float, dict[str, Any]]:
        recall = self.recall(stream_detail, truth)
        return recall["guaranteed_miss_rate"], recall

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
            "guaranteed": len(guaranteed),  # how many true top-k items theory guarantees (0: the rate says nothing)
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
        self.place_many((x,))

    def place_many(self, items: Sequence[float]) -> None:
        """``place`` each item in order (one call per fetched batch's share of a window in the stream)."""
        capacity = self.capacity
        for item in items:
            x = item
            if x > capacity:
                full, x = divmod(x, capacity)
                for _ in range(int(full)):
                    self._open(0.0)
                if x == 0:
                    continue
            tree = self.tree
            if tree[1] < x:
                self._open(capacity - x)
                continue
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
    bins.place_many(items)
    return len(bins)


def _exact_grid(values: np.ndarray, capacity: float) -> bool:
    """Whether the items and the capacity are multiples of one power of two 2^p with the capacity below
    2^53 * 2^p: then every room (capacity minus some items) is a multiple of 2^p below that, so subtracting
    items is exact and taking k items at once (room - k * x) equals taking them one by one."""
    both = np.append(values, capacity)
    if not np.isfinite(both).all():
        return False
    lowest = grid_exponent(both)
    return lowest is None or capacity < math.ldexp(1.0, 53 + lowest)


def first_fit_decreasing(items: Sequence[float] | np.ndarray, capacity: float) -> int:
    """Bins First Fit uses for items already sorted largest first: the same count, bin for bin and with the
    same float arithmetic, as :func:`first_fit` on them, in O(sizes x bins) vectorized instead of O(items log
    bins) in Python.

    Equal items come in runs, and within a run a bin that has no room for one item has none for the next:
    each run fills the open bins that have room, in order from the first, then opens bins of its own. When the
    arithmetic is exact (:func:`_exact_grid`) a bin takes its share of a run in one step; otherwise item by
    item. Items larger than a bin are placed one by one; negative ones (a bin's room would grow) take
    :func:`first_fit`'s path.
    """
    arr = np.asarray(items, dtype=np.float64)
    if not len(arr):
        return 0
    if arr[-1] < 0:
        return first_fit(arr.tolist(), capacity)
    change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
    starts = np.concatenate([[0], change])
    sizes = arr[starts].tolist()
    runs = np.diff(np.concatenate([starts, [len(arr)]])).tolist()
    exact = _exact_grid(arr[starts], capacity)
    rooms = np.zeros(max(16, len(arr)), dtype=np.float64)  # bins in opening order: their rooms
    n = 0

    def grow(extra: int) -> None:
        nonlocal rooms
        if n + extra > len(rooms):
            rooms = np.concatenate([rooms, np.zeros(max(n + extra, 2 * len(rooms)) - len(rooms))])

    for x, m in zip(sizes, runs, strict=True):
        if x > capacity:  # first_fit's rule: whole bins of its own, then the rest as an item
            full, rest = divmod(x, capacity)
            for _ in range(m):
                grow(int(full) + 1)
                n += int(full)  # their rooms are 0.0
                if rest:
                    fits = np.flatnonzero(rooms[:n] >= rest)
                    if len(fits):
                        rooms[fits[0]] -= rest
                    else:
                        rooms[n] = capacity - rest
                        n += 1
            continue
        for b in np.flatnonzero(rooms[:n] >= x).tolist():  # the bins with room, first to last
            room = float(rooms[b])
            if exact and x > 0:
                k = min(m, int(room // x))
                while k and room - k * x < 0:  # (never, on the grid; kept as the definition's guard)
                    k -= 1
                room -= k * x
                m -= k
            else:
                while m and room >= x:
                    room -= x
                    m -= 1
            rooms[b] = room
            if not m:
                break
        if m and exact and x > 0:  # new bins of `per` items each, the last one with what is left
            per = min(m, int(capacity // x))
            while per > 1 and capacity - per * x < 0:
                per -= 1
            per = max(per, 1)
            full_bins, left = divmod(m, per)
            grow(full_bins + 1)
            rooms[n : n + full_bins] = capacity - per * x
            n += full_bins
            if left:
                rooms[n] = capacity - left * x
                n += 1
            m = 0
        while m:
            grow(1)
            room = capacity - x
            m -= 1
            while m and room >= x:
                room -= x
                m -= 1
            rooms[n] = room
            n += 1
    return n


class BinPacking(Aggregate):
    """Online First Fit as items arrive; offline First Fit Decreasing, with the lower bound ceil(sum/capacity).

    Accuracy is the competitive ratio FF/FFD: theory bounds FF by 1.7 OPT and FFD >= OPT, so FF/FFD <= 1.7.
    """

    kind = "binpack"
    error_name = "FF / FFD"
    error_sql = "CASE WHEN t.value = 0 THEN 'Infinity'::double precision ELSE s.value / t.value END"
    # FFD <= 11/9 OPT + 6/9, so OPT >= (9 FFD - 6) / 11: fewer bins than that packs nothing correctly
    impossible_sql = "stream_value < (9 * batch_value - 6) / 11"
    advice = "compare the stream's packing of {metric} with the truth's in the report; FF may need up to 1.7x the bins."
    sorted_input = True
    params_spec = {"capacity": Param(float, required=True, low=0, low_open=True, example="64")}

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

    def add_many(self, state: FirstFitBins, values: Sequence[float]) -> FirstFitBins:
        state.place_many(values)
        return state

    def result(self, state: FirstFitBins) -> tuple[float, Detail]:
        return float(len(state)), None

    def exact(self, values: Sequence[float]) -> tuple[float, Detail]:
        ffd = first_fit_decreasing(sorted(values, reverse=True), self.capacity)
        lower = math.ceil(math.fsum(values) / self.capacity - 1e-9)
        return float(ffd), {"lower_bound": lower}

    def exact_windows(
        self, values: np.ndarray, bounds: np.ndarray, labels: np.ndarray | None = None
    ) -> list[tuple[float, Detail]]:
        flat = np.asarray(values, np.float64)
        out = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            window = flat[a:b]
            ffd = first_fit_decreasing(window[::-1], self.capacity)
            lower = math.ceil(exact_sums(window, np.array([0, b - a]))[0] / self.capacity - 1e-9)
            out.append((float(ffd), {"lower_bound": lower}))
        return out

    def accuracy(
        self,
        stream_value: float,
        stream_detail: Detail,
        truth: Sequence[Any],
        exact: tuple[float, Detail],
        seen: Sequence[Any],
    ) -> tuple[float, dict[str, Any]]:
        ffd, lower = exact[0], (exact[1] or {})["lower_bound"]
        error = stream_value / ffd if ffd else (0.0 if stream_value == 0 else math.inf)
        return error, {"ff_over_lower_bound": stream_value / lower if lower else None, "lower_bound": lower}

    def bound(self) -> float:
        return 1.7

    def state_bytes(self, state: FirstFitBins) -> int:
        return 8 * len(state.tree)


AGGREGATES: dict[str, type[Aggregate]] = {
    cls.kind: cls for cls in (Count, Sum, Mean, Min, Max, DistinctCount, Quantile, TopK, BinPacking)
}


def register(cls: type[Aggregate]) -> type[Aggregate]:
    """Add a kind (a class decorator): definitions accept it, both engines run it, the comparison view judges it
    once the schema is created again (storage.init_schema)."""
    if not cls.kind.replace("_", "").isalnum():
        raise ValueError(f"kind {cls.kind!r}: letters, digits and _ only")
    AGGREGATES[cls.kind] = cls
    return cls


def aggregate_for(kind: str, params: dict[str, Any] | None = None) -> Aggregate:
    """The aggregate implementing a metric kind."""
    return AGGREGATES[kind](params)


def all_params() -> dict[str, Param]:
    """Every parameter any kind takes (one name means one type in every kind that takes it)."""
    out: dict[str, Param] = {}
    for cls in AGGREGATES.values():
        for name, spec in cls.params_spec.items():
            if name in out and out[name].type is not spec.type:
                raise TypeError(f"parameter {name!r} is {out[name].type.__name__} in one kind, not in {cls.kind!r}")
            out.setdefault(name, spec)
    return out


def sql_literal(kind: str) -> str:
    if not kind.replace("_", "").isalnum():
        raise ValueError(f"kind {kind!r}: letters, digits and _ only")
    return f"'{kind}'"


def error_case_sql() -> str:
    """The error column of quality.comparison: each kind's error_sql, NULL where the stream has no value."""
    whens = "\n".join(f"         WHEN q.kind = {sql_literal(k)} THEN {cls.error_sql}" for k, cls in AGGREGATES.items())
    # a metric not (yet) in quality.metrics has no kind there: judged by relative error, as before kinds had SQL
    return f"CASE\n         WHEN s.value IS NULL THEN NULL\n{whens}\n         ELSE {RELATIVE_ERROR_SQL}\n       END"


def impossible_sql() -> str:
    """A SQL condition over quality.comparison's columns: the stream's value is impossible for its kind."""
    parts = [f"(kind = {sql_literal(k)} AND {c.impossible_sql})" for k, c in AGGREGATES.items() if c.impossible_sql]
    return " OR ".join(parts) or "false"
