"""Aggregations, each defined once with both an online form (the stream) and an offline form (the batch).

An aggregate has ``new()`` -> state, ``add(state, value)`` -> state, ``result(state)`` -> float for the stream,
and ``exact(values)`` -> float for the batch. For the exact kinds both give bit-identical results on the same
multiset of values (sums are exact: Shewchuk partials online, ``math.fsum`` offline), so any difference the
nightly comparison finds comes from the data the stream saw, not from arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar


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


class Aggregate:
    """Base of all aggregates; subclasses set ``kind``."""

    kind: ClassVar[str]
    needs_value: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = params or {}

    def new(self) -> Any:
        raise NotImplementedError

    def add(self, state: Any, value: float) -> Any:
        raise NotImplementedError

    def result(self, state: Any) -> float:
        raise NotImplementedError

    def exact(self, values: Sequence[float]) -> float:
        raise NotImplementedError


class Count(Aggregate):
    kind = "count"
    needs_value = False

    def new(self) -> int:
        return 0

    def add(self, state: int, value: float) -> int:
        return state + 1

    def result(self, state: int) -> float:
        return float(state)

    def exact(self, values: Sequence[float]) -> float:
        return float(len(values))


class Sum(Aggregate):
    kind = "sum"

    def new(self) -> list[float]:
        return []

    def add(self, state: list[float], value: float) -> list[float]:
        return add_partial(state, value)

    def result(self, state: list[float]) -> float:
        return math.fsum(state)

    def exact(self, values: Sequence[float]) -> float:
        return math.fsum(values)


class Mean(Aggregate):
    kind = "mean"

    def new(self) -> list[Any]:
        return [0, []]

    def add(self, state: list[Any], value: float) -> list[Any]:
        state[0] += 1
        add_partial(state[1], value)
        return state

    def result(self, state: list[Any]) -> float:
        return math.fsum(state[1]) / state[0] if state[0] else math.nan

    def exact(self, values: Sequence[float]) -> float:
        return math.fsum(values) / len(values) if len(values) else math.nan


class Min(Aggregate):
    kind = "min"

    def new(self) -> float:
        return math.inf

    def add(self, state: float, value: float) -> float:
        return value if value < state else state

    def result(self, state: float) -> float:
        return state

    def exact(self, values: Sequence[float]) -> float:
        return float(min(values))


class Max(Aggregate):
    kind = "max"

    def new(self) -> float:
        return -math.inf

    def add(self, state: float, value: float) -> float:
        return value if value > state else state

    def result(self, state: float) -> float:
        return state

    def exact(self, values: Sequence[float]) -> float:
        return float(max(values))


AGGREGATES: dict[str, type[Aggregate]] = {cls.kind: cls for cls in (Count, Sum, Mean, Min, Max)}


def aggregate_for(kind: str, params: dict[str, Any] | None = None) -> Aggregate:
    """The aggregate implementing a metric kind."""
    return AGGREGATES[kind](params)
