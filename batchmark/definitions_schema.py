"""The definitions file's shape, checked strictly before anything reads it.

Every table of the file is a pydantic model that forbids unknown keys and coerces nothing, so a typo
(``allowed_latenes``), a wrong type (``window = 5``) or an impossible value is refused when the file loads, naming
the key, its line and what is accepted. ``batchmark.definitions`` then turns the checked tables into the domain
objects and checks what depends on several keys at once (a group key that is not a field, a window that does not
divide a day).
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from batchmark.aggregates import AGGREGATES, all_params
from batchmark.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FieldModel(_Strict):
    """``[dataset.fields]`` entry: a field's type, range and whether it may be null."""

    type: Literal["string", "float", "int"] = "string"
    min: float | None = None
    max: float | None = None
    max_length: int = Field(256, gt=0, le=65536)
    nullable: bool = False


class CsvModel(_Strict):
    """``[dataset.csv]``: how a CSV file's rows become records (batchmark.csv_source says what each key does)."""

    rename: dict[str, str] = {}
    null_values: list[str] = ["", "NA", "N/A", "NaN", "null", "NULL"]
    id_from: list[str] = Field([], max_length=32)
    time_from: list[str] = Field([], max_length=8)
    time_format: str | None = None
    time_zone: str | None = None
    delimiter: str = Field(",", min_length=1, max_length=1)


class DatasetModel(_Strict):
    """``[dataset]``: the event schema."""

    name: str = Field("dataset", pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
    event_id: str = "event_id"
    event_time: str = "event_time"
    partition_key: str | None = None
    min_event_time: str = "2000-01-01T00:00:00Z"
    max_event_time: str = "2100-01-01T00:00:00Z"
    timezone: str = "UTC"
    fields: dict[str, FieldModel] = {}
    csv: CsvModel | None = None


class _MetricBase(_Strict):
    """``[[metric]]``: one metric; the kinds' parameters are added from the kinds (``MetricModel``)."""

    name: str
    kind: str
    group_by: list[str] = []
    window: str | int = "1m"
    allowed_lateness: str | int = "0s"
    tolerance: float | None = None
    mostly: float | None = None
    value: str | None = None
    field: str | None = None
    where: str | None = None


class VersionModel(_Strict):
    """``[[version]]``: a version of the streaming app (Kappa comparison): what differs from the definitions."""

    label: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")
    description: str = ""
    definitions: str | None = None  # another definitions file (relative to this one) instead of overrides
    metrics: dict[str, dict[str, Any]] = {}  # metric name (or "*": every metric) -> keys of [[metric]] to override
    worker: dict[str, int | float] = {}  # worker knobs: take_max, take_within, max_fetch_size, checkpoint_interval_s


class _FileBase(_Strict):
    """The whole file."""

    dataset: DatasetModel = DatasetModel()
    alerts: dict[str, Any] = {}
    version: list[VersionModel] = []


@functools.cache
def _models(kinds: tuple[str, ...]) -> tuple[type[BaseModel], type[BaseModel]]:
    # Every kind's parameters (each kind's params_spec) are keys a [[metric]] may have; whether this metric's
    # kind takes them, and their ranges, is checked against the kind afterwards. Built per set of kinds, so a
    # kind registered later (aggregates.register) brings its parameters with it.
    metric = create_model(  # type: ignore[call-overload]
        "MetricModel",
        __base__=_MetricBase,
        __doc__="``[[metric]]``: one metric; the kind's own parameters are checked against the kind afterwards.",
        **{name: (p.type | None, None) for name, p in all_params().items()},
    )
    file = create_model("FileModel", __base__=_FileBase, metric=(list[metric], []))  # type: ignore[call-overload]
    return metric, file


def models() -> tuple[type[BaseModel], type[BaseModel]]:
    """(the [[metric]] model, the whole file's model) for the kinds there are now."""
    return _models(tuple(AGGREGATES))


_TYPE_WORDS = {
    "string_type": "a string in quotes",
    "float_type": "a number",
    "int_type": "a whole number",
    "bool_type": "true or false",
    "list_type": 'a list, e.g. ["a", "b"]',
    "dict_type": "a table",
    "model_type": "a table",
}


def check_file(raw: dict[str, Any], text: str, source: str) -> BaseModel:
    """The parsed TOML checked against the file's model; the first problems are raised as one ConfigError."""
    try:
        return models()[1].model_validate(raw)
    except ValidationError as exc:
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        for err in exc.errors():
            # pydantic names the member of a union it tried ('str', 'int'): drop it, and join the members' words
            loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
            if loc in merged and err["type"] in _TYPE_WORDS and merged[loc]["type"] in _TYPE_WORDS:
                merged[loc]["words"].append(_TYPE_WORDS[err["type"]])
                continue
            merged.setdefault(loc, {**err, "loc": loc, "words": [_TYPE_WORDS.get(err["type"], "")]})
        problems = [_explain(err, text, source, raw) for err in list(merged.values())[:5]]
        raise ConfigError("\n".join(problems)) from None


_UNION_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,any]", "none"}


def _explain(err: dict[str, Any], text: str, source: str, raw: dict[str, Any]) -> str:
    loc = err["loc"]
    line = line_of(text, loc)
    where = f"{source}:{line}" if line else source
    key = _describe(loc, raw)
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        accepted = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: {key} is not a known key{hint}; accepted keys here: {', '.join(accepted)}"
    if kind in _TYPE_WORDS:
        return f"{where}: {key} must be {' or '.join(err['words'])}, not {err.get('input')!r}"
    if kind == "literal_error":
        return f"{where}: {key} is {err.get('input')!r}; {err['msg'].lower()}"
    return f"{where}: {key}: {err['msg']} (got {err.get('input')!r})"


def _describe(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """'[[metric]] #2 (name 's'): window' / '[dataset.fields.b]: type': where the key is, as a person reads it."""
    if len(loc) >= 2 and loc[0] == "metric" and isinstance(loc[1], int):
        try:
            name = raw["metric"][loc[1]].get("name")
        except (KeyError, IndexError, AttributeError):
            name = None
        table = f"[[metric]] #{loc[1] + 1}" + (f" (name {name!r})" if isinstance(name, str) else "")
        rest = loc[2:]
    else:
        table = f"[{'.'.join(map(str, loc[:-1]))}]" if len(loc) > 1 else "the top level"
        rest = loc[-1:]
    return f"{table}: {'.'.join(map(str, rest))}" if rest else table


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the keys at loc (the table an unknown key was found in)."""
    names = tuple(p for p in loc if not isinstance(p, int))
    table = {
        (): models()[1],
        ("dataset",): DatasetModel,
        ("metric",): models()[0],
        ("version",): VersionModel,
        ("dataset", "csv"): CsvModel,
    }
    if len(names) == 3 and names[:2] == ("dataset", "fields"):
        return FieldModel
    return table.get(names)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the key at loc (e.g. ('metric', 2, 'window')) in the TOML text, best effort."""
    current: tuple[Any, ...] = ()
    arrays: dict[tuple[str, ...], int] = {}
    best: tuple[int, int] | None = None  # (length of the matched prefix, line)
    for number, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            path = tuple(p.strip().strip('"') for p in m.group(2).split("."))
            if m.group(1) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                current = (*path, arrays[path])
            else:
                current = path
            if loc[: len(current)] == current and (best is None or len(current) >= best[0]):
                best = (len(current), number)
            continue
        if loc[: len(current)] != current or len(loc) <= len(current):
            continue
        key = str(loc[len(current)])
        if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*[=.]", line):
            return number
    return best[1] if best else None
