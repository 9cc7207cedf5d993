"""Dataset and metric definitions, loaded from one TOML file (see ``metrics.toml``).

A metric is declared once; the stream worker, the Spark job and the GX suite all derive from it.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from batchmark.drift import DriftSettings
from batchmark.errors import ConfigError
from batchmark.windows import DAY_MS, Calendar

FIELD_TYPES = ("string", "float", "int")
RESERVED = {"event_id", "event_time_ms", "event_date", "_partition", "_offset"}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def parse_duration_ms(text: str | int) -> int:
    """'1m' -> 60000. Integers are taken as milliseconds."""
    if isinstance(text, int):
        return text
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(f"bad duration {text!r}: write a number and a unit, e.g. '30s', '1m', '1h'")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_time_ms(text: str) -> int:
    """ISO-8601 with a zone -> epoch milliseconds."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ConfigError(f"time {text!r} has no zone: add 'Z' or '+00:00'")
    return int(dt.timestamp() * 1000)


@dataclass(frozen=True)
class FieldSpec:
    """One typed field of the dataset with its accepted range."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    max_length: int = 256
    nullable: bool = False  # a record may omit it or carry null (see docs/datasets.md for what metrics do then)


@dataclass(frozen=True)
class Dataset:
    """The event schema: which source fields carry identity, time and the measured values."""

    name: str
    event_id: str
    event_time: str
    partition_key: str
    fields: tuple[FieldSpec, ...]
    min_event_time_ms: int
    max_event_time_ms: int
    csv: Any = None  # batchmark.csv_source.CsvSpec: how a CSV file's rows become records ([dataset.csv])
    timezone: str = "UTC"  # the zone of the dataset's days: lake partitions, the nightly day, day-aligned windows

    @functools.cached_property
    def calendar(self) -> Calendar:
        """The dataset's days and windows in its time zone."""
        return Calendar(self.timezone)

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @functools.cached_property
    def accepted_keys(self) -> frozenset[str]:
        """Every key a source record may carry: the id, the time and the fields."""
        return frozenset((self.event_id, self.event_time, *self.field_names))

    @functools.cached_property
    def field_checks(self) -> tuple[tuple[FieldSpec, str, str, float, float, int], ...]:
        """(spec, name, type, min, max, max_length) per field, unbounded ends as -inf/inf: validation's fast path."""
        inf = float("inf")
        return tuple(
            (f, f.name, f.type, -inf if f.min is None else f.min, inf if f.max is None else f.max, f.max_length)
            for f in self.fields
        )

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


_ALLOWED_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.USub,
    ast.UAdd,
)


def divide(a: Any, b: Any) -> Any:
    """``a / b`` in a value expression: NaN where b is 0, for a record's numbers (the stream) and for pandas
    columns (the batch) alike. NaN carries through the rest of the expression, and a record whose value is NaN
    has no value for the metric: both engines skip it, as they skip a null (``Metric.present``)."""
    if isinstance(b, int | float):
        return a / b if b != 0 else math.nan
    return (a / b).where(b != 0)


def _constant_zero(node: ast.AST) -> bool:
    """Whether a divisor names no field and is 0 (or divides by 0 itself): every record would have no value."""
    if any(isinstance(n, ast.Name) for n in ast.walk(node)):
        return False
    try:
        return eval(compile(ast.Expression(node), "<divisor>", "eval"), {"__builtins__": {}}) == 0  # noqa: S307
    except ZeroDivisionError:
        return True


def compile_value(expr: str, numeric_fields: set[str]) -> tuple[Callable[[dict[str, Any]], float], str]:
    """Compile a metric's value expression ('cpu * duration_s') for Python, and return its Spark SQL text.

    Only field names, numbers and + - * / are allowed, so the same text means the same thing to both engines;
    ``/`` is ``divide`` (a zero divisor gives no value instead of an error).
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"value expression {expr!r} is not valid: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ConfigError(f"value expression {expr!r} may only use field names, numbers and + - * /")
        if isinstance(node, ast.Name) and node.id not in numeric_fields:
            raise ConfigError(
                f"value expression {expr!r} names {node.id!r}, which is not a numeric field "
                f"of the dataset ({', '.join(sorted(numeric_fields))})"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float):
            raise ConfigError(f"value expression {expr!r} has a non-numeric constant")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _constant_zero(node.right):
            raise ConfigError(f"value expression {expr!r} divides by 0")
    if not any(isinstance(node, ast.Name) for node in ast.walk(tree)):
        raise ConfigError(f'value expression {expr!r} names no field (to count records, use kind = "count")')

    class _ToSubscript(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(
                ast.Subscript(value=ast.Name(id="r", ctx=ast.Load()), slice=ast.Constant(node.id), ctx=ast.Load()),
                node,
            )

        def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
            self.generic_visit(node)
            if not isinstance(node.op, ast.Div):
                return node
            call = ast.Call(func=ast.Name(id="divide", ctx=ast.Load()), args=[node.left, node.right], keywords=[])
            return ast.copy_location(call, node)

    sql = " ".join(f"`{tok}`" if tok in numeric_fields else tok for tok in re.findall(r"[A-Za-z_]\w*|\S", expr))
    if isinstance(tree.body, ast.Name):  # a field alone: r[field], in C (the stream evaluates it per event)
        return operator.itemgetter(tree.body.id), sql
    body = _ToSubscript().visit(tree).body
    fn_tree = ast.Expression(
        body=ast.Lambda(
            args=ast.arguments(posonlyargs=[], args=[ast.arg("r")], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=body,
        )
    )
    ast.fix_missing_locations(fn_tree)
    env = {"__builtins__": {}, "divide": divide}
    fn = eval(compile(fn_tree, f"<metric value {expr}>", "eval"), env)  # noqa: S307 (checked above)
    return fn, sql


@dataclass(frozen=True)
class Metric:
    """One metric: what to aggregate, per which keys, over which event-time window, and how exact it must be.

    tolerance: the largest accuracy error allowed per window (default: the kind's theoretical bound);
    mostly: the share of windows that must be within it (1.0 for deterministic kinds, 0.99 for sketches).
    """

    @property
    def aggregate(self) -> Any:
        from batchmark.aggregates import aggregate_for

        return aggregate_for(self.kind, self.params)

    name: str
    kind: str
    group_by: tuple[str, ...]
    window_ms: int
    allowed_lateness_ms: int
    tolerance: float
    mostly: float = 1.0
    value_expr: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    value_fn: Callable[[dict[str, Any]], float] | None = field(default=None, compare=False, repr=False)
    value_sql: str | None = None
    value_type: str | None = None  # the field's type, for kinds that read a field
    where: str | None = None  # "<field> is null" / "<field> is not null": the only records the metric reads
    # The nullable fields the value reads (a record with one of them null has no value for this metric) and the
    # where clause, as (field, want_null): together they say whether a record counts for the metric.
    needs: tuple[str, ...] = ()
    where_rule: tuple[str, bool] | None = None
    divides: bool = False  # the value has a '/': a record where a divisor is 0 has no value (``divide``)

    @property
    def reads_every_record(self) -> bool:
        """Whether every valid record counts for this metric (no where clause, no nullable input, no division)."""
        return not self.needs and self.where_rule is None and not self.divides

    def present(self, record: dict[str, Any]) -> bool:
        """Whether a clean record counts for this metric: the where clause holds, the value's fields are set and
        the value is defined (no division by 0). Both engines use this rule (present_mask is its columnar form)."""
        if self.where_rule is not None and (record.get(self.where_rule[0]) is None) != self.where_rule[1]:
            return False
        if not all(record.get(f) is not None for f in self.needs):
            return False
        if self.divides:
            value = self.value_fn(record)
            return value == value  # NaN: a divisor was 0
        return True

    def present_mask(self, frame: Any) -> Any:
        """present() for every row of a pandas frame, as a numpy bool array."""
        import numpy as np

        mask = np.ones(len(frame), dtype=bool)
        if self.where_rule is not None:
            mask &= frame[self.where_rule[0]].isna().to_numpy() == self.where_rule[1]
        for f in self.needs:
            mask &= frame[f].notna().to_numpy()
        if self.divides:
            mask &= np.asarray(self.value_fn(frame).notna().to_numpy(), dtype=bool)
        return mask


STABLE = "stable"  # the version label of the definitions as written


@dataclass(frozen=True)
class WorkerKnob:
    """A stream worker setting (streaming.worker.Knobs): its environment variable, kind and accepted range.
    Both the worker's environment and a [[version]]'s worker table are checked against it."""

    env: str
    kind: type  # int or float
    least: float
    most: float

    def check(self, value: Any) -> str | None:
        """What is wrong with a value (None if it is fine)."""
        ok_type = type(value) is int or (self.kind is float and type(value) is float)
        if ok_type and self.least <= value <= self.most:  # a NaN fails the range
            return None
        if self.kind is int:
            return f"must be a whole number from {self.least:,} to {self.most:,}"
        return f"must be a number from {self.least:g} to {self.most:g}"


WORKER_KNOBS = {  # a [[version]]'s worker table -> the worker's environment (streaming.worker.Knobs)
    "take_max": WorkerKnob("BATCHMARK_TAKE_MAX", int, 1, 1_000_000),
    # under a millisecond, the fetch would not wait at all and starve the event loop
    "take_within": WorkerKnob("BATCHMARK_TAKE_WITHIN", float, 0.001, 60.0),
    "max_fetch_size": WorkerKnob("BATCHMARK_MAX_FETCH_SIZE", int, 1024, 2**31 - 1),  # Kafka's int32
    "checkpoint_interval_s": WorkerKnob("BATCHMARK_CHECKPOINT_INTERVAL_S", float, 0.01, 3600.0),
    # 0: Python's own GC settings; at most a C int (gc.set_threshold)
    "gc_young": WorkerKnob("BATCHMARK_GC_YOUNG", int, 0, 2**31 - 1),
}
# what a version may change besides the kind's own parameters: what the streaming app computes (a tolerance is
# the yardstick, not the app: a comparison judges both versions by the stable one's)
VERSION_KEYS = ("window", "allowed_lateness")


@dataclass(frozen=True)
class Version:
    """A version of the streaming app: a label, what it changes, and the worker settings it runs with."""

    label: str
    description: str = ""
    definitions: str | None = None
    metrics: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (metric or '*', ((key, value), ...))
    worker: tuple[tuple[str, Any], ...] = ()

    def worker_env(self) -> dict[str, str]:
        """The environment variables of its worker settings."""
        return {WORKER_KNOBS[k].env: str(v) for k, v in self.worker}

    def changes(self) -> str:
        """What it changes, in one line."""
        parts = [f"definitions {self.definitions}"] if self.definitions else []
        parts += [f"{m}: " + ", ".join(f"{k} = {v!r}" for k, v in kv) for m, kv in self.metrics]
        parts += [f"worker {k} = {v!r}" for k, v in self.worker]
        return "; ".join(parts) or "nothing"


@dataclass(frozen=True)
class Definitions:
    """The dataset and its metrics."""

    dataset: Dataset
    metrics: tuple[Metric, ...]
    source: Path | None = None
    alerts: DriftSettings = DriftSettings()  # the [alerts] table: trend and drift checks, suppression
    version: str = STABLE  # which version of the streaming app these definitions are ([[version]] label)
    versions: tuple[Version, ...] = ()  # the file's [[version]] tables

    def version_spec(self, label: str) -> Version:
        """The [[version]] with this label ('stable': the definitions as written)."""
        if label == STABLE:
            return Version(STABLE, "the definitions as written (production)")
        for v in self.versions:
            if v.label == label:
                return v
        known = ", ".join([STABLE, *(v.label for v in self.versions)])
        raise ConfigError(f"no version {label!r} in {self.source}; the versions there: {known} (add a [[version]])")

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.metrics)
        raise ConfigError(f"unknown metric {name!r}; the definitions have: {known}")

    def only(self, names: list[str] | tuple[str, ...]) -> Definitions:
        """These definitions with just the named metrics (all when none are named); an unknown name is refused
        with the list of known ones."""
        if not names:
            return self
        return replace(self, metrics=tuple(self.metric(name) for name in names))


def _dataset(raw: dict[str, Any]) -> Dataset:
    fields = []
    for name, spec in (raw.get("fields") or {}).items():
        at = ("dataset", "fields", name)  # where the problem is, for its line in the file
        if not _NAME.match(name) or name in RESERVED:
            raise _located(
                ConfigError(f"field name {name!r} is not allowed: use lower_snake_case, not {sorted(RESERVED)}"), at
            )
        ftype = spec.get("type", "string")
        if ftype not in FIELD_TYPES:
            raise _located(ConfigError(f"field {name!r} has type {ftype!r}; use one of {FIELD_TYPES}"), at)
        lo, hi = spec.get("min"), spec.get("max")
        if lo is not None and hi is not None and lo > hi:
            raise _located(ConfigError(f"field {name!r}: min {lo} is above max {hi}"), at)
        if ftype == "string" and (lo is not None or hi is not None):
            raise _located(ConfigError(f"field {name!r}: min/max are for numbers; a string field takes max_length"), at)
        fields.append(
            FieldSpec(
                name=name,
                type=ftype,
                min=lo,
                max=hi,
                max_length=int(spec.get("max_length", 256)),
                nullable=bool(spec.get("nullable", False)),
            )
        )
    if not fields:
        raise ConfigError("[dataset.fields] is empty: list the fields your events carry")
    ds = Dataset(
        name=raw.get("name", "dataset"),
        event_id=raw.get("event_id", "event_id"),
        event_time=raw.get("event_time", "event_time"),
        partition_key=raw.get("partition_key", fields[0].name),
        fields=tuple(fields),
        min_event_time_ms=parse_time_ms(raw.get("min_event_time", "2000-01-01T00:00:00Z")),
        max_event_time_ms=parse_time_ms(raw.get("max_event_time", "2100-01-01T00:00:00Z")),
        csv=_csv(raw["csv"]) if raw.get("csv") is not None else None,
        timezone=_zone(raw.get("timezone", "UTC")),
    )
    if ds.partition_key not in ds.field_names:
        raise _located(
            ConfigError(f"partition_key {ds.partition_key!r} is not one of the fields"), ("dataset", "partition_key")
        )
    if ds.field(ds.partition_key).nullable:
        raise _located(
            ConfigError(f"partition_key {ds.partition_key!r} cannot be nullable: every record needs a partition"),
            ("dataset", "fields", ds.partition_key),
        )
    if ds.min_event_time_ms >= ds.max_event_time_ms:
        raise _located(ConfigError("min_event_time must be before max_event_time"), ("dataset", "max_event_time"))
    return ds


def _located(exc: ConfigError, loc: tuple[Any, ...]) -> ConfigError:
    """exc, marked with where in the file its problem is (load_definitions names that line)."""
    exc.loc = loc  # type: ignore[attr-defined]
    return exc


def _zone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone {name!r} is not an IANA time zone name, e.g. 'America/New_York'") from None
    return name


def _csv(raw: dict[str, Any]) -> Any:
    from batchmark.csv_source import CsvSpec

    return CsvSpec.from_table(raw)


_WHERE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s+is\s+(not\s+)?null\s*$", re.IGNORECASE)


def _params(name: str, kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The kind's parameters from a [[metric]] entry, checked against what the kind accepts (its params_spec)."""
    from batchmark.aggregates import AGGREGATES, all_params

    spec = AGGREGATES[kind].params_spec
    for k in sorted(set(all_params()) - set(spec)):
        if k in raw:
            takes = ", ".join(spec) or "none"
            raise ConfigError(f"metric {name!r}: kind {kind!r} has no parameter {k!r} (its parameters: {takes})")
    params = {k: raw[k] for k in spec if k in raw}
    for k, p in spec.items():
        if p.required and k not in params:
            example = f", e.g. {k} = {p.example}" if p.example else ""
            raise ConfigError(f"metric {name!r}: kind {kind!r} needs {k!r}{example}")
    for k, v in params.items():
        if why := spec[k].check(v):
            raise ConfigError(f"metric {name!r}: {k} {why}")
    return params


def _metric(raw: dict[str, Any], ds: Dataset) -> Metric:
    from batchmark.aggregates import AGGREGATES, aggregate_for

    name = raw.get("name", "")
    if not _NAME.match(name):
        raise ConfigError(f"metric name {name!r} must be lower_snake_case (letters, digits, _)")
    kind = raw.get("kind")
    if kind not in AGGREGATES:
        raise ConfigError(f"metric {name!r}: kind {kind!r} is not one of {tuple(AGGREGATES)}")
    group_by = tuple(raw.get("group_by", []))
    for key in group_by:
        if key not in ds.field_names:
            raise ConfigError(f"metric {name!r}: group_by field {key!r} is not a dataset field")
        if ds.field(key).nullable:
            raise ConfigError(
                f"metric {name!r}: group_by field {key!r} is nullable; a group key must always be set "
                "(declare it without nullable, or group by another field)"
            )
    if group_by and ds.partition_key not in group_by:
        raise ConfigError(
            f"metric {name!r}: group_by must include the partition key {ds.partition_key!r} "
            "so that each group is computed by one stream worker"
        )
    window_ms = parse_duration_ms(raw.get("window", "1m"))
    if window_ms <= 0 or DAY_MS % window_ms:
        raise ConfigError(f"metric {name!r}: window must divide one day evenly (e.g. 1m, 5m, 1h)")
    params = _params(name, kind, raw)
    agg = aggregate_for(kind, params)
    numeric = {f.name for f in ds.fields if f.type in ("float", "int")}
    value_expr = raw.get("value")
    value_fn = value_sql = None
    if agg.input == "none" and ("value" in raw or "field" in raw):
        raise ConfigError(f"metric {name!r}: kind {kind!r} counts records; remove 'value'/'field'")
    if agg.input == "number" and "field" in raw:
        raise ConfigError(f'metric {name!r}: kind {kind!r} reads a number: write value = "...", not field')
    if agg.input == "field" and "value" in raw:
        raise ConfigError(f'metric {name!r}: kind {kind!r} reads a field: write field = "...", not value')
    if agg.input == "number":
        if not value_expr:
            raise ConfigError(f"metric {name!r}: kind {kind!r} needs a 'value' expression, e.g. value = \"cpu\"")
        value_fn, value_sql = compile_value(value_expr, numeric)
    elif agg.input == "field":
        field_name = raw.get("field")
        if field_name not in ds.field_names:
            raise ConfigError(f"metric {name!r}: kind {kind!r} needs 'field', one of {ds.field_names}")
        value_expr = field_name
        value_fn = operator.itemgetter(field_name)  # r[field_name], in C
        value_sql = f"`{field_name}`"
    tolerance = float(raw.get("tolerance", agg.bound()))
    if not 0.0 <= tolerance < 1e6:
        raise ConfigError(f"metric {name!r}: tolerance must be >= 0")
    mostly = float(raw.get("mostly", 0.99 if agg.probabilistic else 1.0))
    if not 0.0 < mostly <= 1.0:
        raise ConfigError(
            f"metric {name!r}: mostly (the share of windows that must be within tolerance) must be in (0, 1]"
        )
    needs: tuple[str, ...] = ()
    divides = False
    if value_expr:
        nodes = list(ast.walk(ast.parse(value_expr, mode="eval")))
        read = {n.id for n in nodes if isinstance(n, ast.Name)}
        needs = tuple(sorted(f for f in read if ds.field(f).nullable))
        divides = any(isinstance(n, ast.Div) for n in nodes)
    where = raw.get("where")
    where_rule = None
    if where is not None:
        wm = _WHERE.match(where)
        if not wm or wm.group(1) not in ds.field_names:
            raise ConfigError(
                f"metric {name!r}: where {where!r} is not understood; write '<field> is null' or "
                f"'<field> is not null' with a field of the dataset ({', '.join(ds.field_names)})"
            )
        if not ds.field(wm.group(1)).nullable:
            raise ConfigError(
                f"metric {name!r}: where {where!r}: field {wm.group(1)!r} is not nullable, so this is always "
                f"{'false' if not wm.group(2) else 'true'}; declare it nullable = true or drop the where"
            )
        where_rule = (wm.group(1), not wm.group(2))
        if where_rule[1] and where_rule[0] in needs:
            raise ConfigError(
                f"metric {name!r}: where {where!r} keeps only records whose {where_rule[0]} is null, and its value "
                f'needs {where_rule[0]}: it could never read a record (count them with kind = "count")'
            )
    return Metric(
        name=name,
        kind=kind,
        group_by=group_by,
        window_ms=window_ms,
        allowed_lateness_ms=parse_duration_ms(raw.get("allowed_lateness", "0s")),
        tolerance=tolerance,
        mostly=mostly,
        value_expr=value_expr,
        params=params,
        value_fn=value_fn,
        value_sql=value_sql,
        value_type=ds.field(value_expr).type if agg.input == "field" else None,
        where=where,
        needs=needs,
        where_rule=where_rule,
        divides=divides,
    )


def load_definitions(path: Path | str, version: str | None = None) -> Definitions:
    """Read and check a definitions file; every problem is reported with what to fix.

    With `version`, the definitions of that ``[[version]]`` of the streaming app: the file's metrics with the
    version's overrides (or the version's own definitions file, over the same dataset)."""
    from batchmark.definitions_schema import check_file, line_of

    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"definitions file {path} does not exist (set BATCHMARK_DEFINITIONS)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"definitions file {path} is not valid TOML: {exc}") from None
    checked = check_file(raw, text, str(path))
    try:
        ds = _dataset(checked.dataset.model_dump(exclude_unset=True))
    except ConfigError as exc:
        raise ConfigError(f"{path}:{line_of(text, getattr(exc, 'loc', ('dataset',))) or 1}: {exc}") from None
    raw_metrics = [m.model_dump(exclude_unset=True) for m in checked.metric]
    metrics = []
    for i, m in enumerate(raw_metrics):
        try:
            metrics.append(_metric(m, ds))
        except ConfigError as exc:
            raise ConfigError(f"{path}:{line_of(text, ('metric', i)) or 1}: {exc}") from None
    if not metrics:
        raise ConfigError(f"{path} defines no [[metric]]")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: metric names must be unique")
    versions = []
    for i, v in enumerate(checked.version):
        try:
            versions.append(_version(v.model_dump(), names))
        except ConfigError as exc:
            raise ConfigError(f"{path}:{line_of(text, ('version', i)) or 1}: {exc}") from None
    labels = [v.label for v in versions]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: [[version]] labels must be unique")
    defs = Definitions(
        dataset=ds,
        metrics=tuple(metrics),
        source=path,
        alerts=_alerts(raw.get("alerts", {}), path),
        versions=tuple(versions),
    )
    if not version or version == STABLE:
        return defs
    spec = defs.version_spec(version)
    if spec.definitions:
        other = load_definitions(path.parent / spec.definitions)
        if other.dataset != ds:
            raise ConfigError(
                f"{path}: [[version]] {version!r}: {spec.definitions} defines another dataset; a version reads "
                "the same records, so its [dataset] must be the same as this file's"
            )
        return replace(other, version=version, versions=defs.versions, source=path)
    from batchmark.aggregates import AGGREGATES

    overrides = dict(spec.metrics)
    every = dict(overrides.get("*", ()))
    takers = {k for k in every if k not in VERSION_KEYS}  # kind parameters under "*": for the kinds that take them
    for k in takers:
        if not any(k in AGGREGATES[m["kind"]].params_spec for m in raw_metrics):
            raise ConfigError(f'{path}: [[version]] {version!r}: no metric here takes {k!r} (metrics."*".{k})')
    changed = []
    for m in raw_metrics:
        spec_params = AGGREGATES[m["kind"]].params_spec
        common = {k: v for k, v in every.items() if k in VERSION_KEYS or k in spec_params}
        merged = {**m, **common, **dict(overrides.get(m["name"], ()))}
        try:
            changed.append(_metric(merged, ds) if merged != m else defs.metric(m["name"]))
        except ConfigError as exc:
            raise ConfigError(f"{path}: [[version]] {version!r}: {exc}") from None
    return replace(defs, metrics=tuple(changed), version=version)


def _version(raw: dict[str, Any], metric_names: list[str]) -> Version:
    """A [[version]] table, checked: known metrics, keys a metric may change, known worker settings."""
    from batchmark.aggregates import all_params

    label = raw["label"]
    if label == STABLE:
        raise ConfigError(f"[[version]] label {STABLE!r} is taken: it names the definitions as written")
    if raw.get("definitions") and raw.get("metrics"):
        raise ConfigError(f"[[version]] {label!r}: give either definitions (a whole file) or metrics (overrides)")
    allowed = {*VERSION_KEYS, *all_params()}
    for metric, keys in raw.get("metrics", {}).items():
        if metric != "*" and metric not in metric_names:
            raise ConfigError(
                f"[[version]] {label!r}: metrics.{metric} is not a metric here ({', '.join(metric_names)}, or '*')"
            )
        for key in keys:
            if key not in allowed:
                raise ConfigError(
                    f"[[version]] {label!r}: metrics.{metric}.{key} cannot be changed by a version; "
                    f"these can: {', '.join(sorted(allowed))}"
                )
    for key, value in raw.get("worker", {}).items():
        if key not in WORKER_KNOBS:
            known = ", ".join(WORKER_KNOBS)
            raise ConfigError(f"[[version]] {label!r}: worker.{key} is not a worker setting ({known})")
        problem = WORKER_KNOBS[key].check(value)
        if problem:
            raise ConfigError(f"[[version]] {label!r}: worker.{key} {problem}")
    return Version(
        label=label,
        description=raw.get("description", ""),
        definitions=raw.get("definitions"),
        metrics=tuple((m, tuple(kv.items())) for m, kv in raw.get("metrics", {}).items()),
        worker=tuple(raw.get("worker", {}).items()),
    )


def _alerts(raw: dict[str, Any], path: Path) -> DriftSettings:
    """The optional [alerts] table: any DriftSettings field, with the type of its default."""
    defaults = DriftSettings()
    known = {f.name: type(getattr(defaults, f.name)) for f in fields(DriftSettings)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: [alerts] has no setting {key!r}; known: {', '.join(known)}")
        want = known[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (want is int and not isinstance(value, int)):
            what = "a whole number" if want is int else "a number"
            raise ConfigError(f"{path}: [alerts] {key} must be {what}, not {value!r}")
        if value < 0:
            raise ConfigError(f"{path}: [alerts] {key} must not be negative (got {value})")
        values[key] = want(value)
    for key in ("trailing_days", "min_history", "z_threshold", "cusum_h"):
        if key in values and values[key] <= 0:
            raise ConfigError(f"{path}: [alerts] {key} must be above 0 (got {values[key]})")
    if values.get("trailing_days", defaults.trailing_days) < values.get("min_history", defaults.min_history):
        raise ConfigError(f"{path}: [alerts] trailing_days must be at least min_history")
    return DriftSettings(**values)
