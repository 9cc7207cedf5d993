"""Event schema validation: one set of rules, used by the stream worker and the Spark job alike.

``decode`` turns raw bytes from the topic into a record; ``validate_record`` checks a record against the
dataset's schema and returns either a clean event dict or a :class:`Rejection` with a reason code.
A clean event has ``event_id`` (str), ``event_time_ms`` (int) and the dataset's fields, typed.
"""

from __future__ import annotations

import json
import keyword
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
import orjson

from batchmark.definitions import Dataset, FieldSpec

MAX_RECORD_BYTES = 64 * 1024

# Reason codes of the dead-letter topic. Stable: dashboards and tests count by them.
REASONS = (
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_field",
    "wrong_type",
    "not_finite",
    "out_of_range",
    "bad_event_time",
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused: a reason code from REASONS and a human-readable detail."""

    reason: str
    detail: str


def decode(raw: bytes) -> dict[str, Any] | Rejection:
    """Bytes from the topic -> a JSON object, or the reason it is not one."""
    if len(raw) > MAX_RECORD_BYTES:
        return Rejection("too_large", f"record is {len(raw)} bytes; the limit is {MAX_RECORD_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return Rejection("invalid_utf8", f"not UTF-8 at byte {uexc.start}")
        try:  # the slow path tells NaN/Infinity and numbers beyond 64 bits apart from broken JSON
            obj = json.loads(text, parse_constant=_reject_constant)
        except _NotFinite as nexc:
            return Rejection("not_finite", f"{nexc} is not a number JSON allows")
        except (ValueError, RecursionError):
            return Rejection("invalid_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


class _NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NotFinite(name)


_fromisoformat = datetime.fromisoformat


def parse_event_time(value: Any) -> int | None:
    """ISO-8601 string with a zone, or epoch milliseconds (int) -> epoch milliseconds; None if neither."""
    t = type(value)
    if t is str:  # the usual case first: every check below costs the stream worker per event
        if not 10 <= len(value) <= 40:
            return None
        try:
            dt = _fromisoformat(value)
        except ValueError:
            return None
        if dt.tzinfo is None:
            return None
        return int(dt.timestamp() * 1000)
    if t is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):  # a subclass of str
        return parse_event_time(str(value))
    return None


def validate_record(obj: dict[str, Any], ds: Dataset) -> dict[str, Any] | Rejection:
    """Check one record against the dataset schema; return the clean event or the first problem found."""
    if not ds.accepted_keys.issuperset(obj):
        unknown = sorted(map(str, (k for k in obj if k not in ds.accepted_keys)))
        return Rejection("unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    event_id = obj.get(ds.event_id)
    if event_id is None:
        return Rejection("missing_field", f"missing {ds.event_id}")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 128:
        return Rejection("wrong_type", f"{ds.event_id} must be a non-empty string of at most 128 characters")
    raw_time = obj.get(ds.event_time)
    if raw_time is None:
        return Rejection("missing_field", f"missing {ds.event_time}")
    ts = parse_event_time(raw_time)
    if ts is None:
        return Rejection(
            "bad_event_time", f"{ds.event_time} must be ISO-8601 with a zone or epoch ms, got {str(raw_time)[:60]!r}"
        )
    if not ds.min_event_time_ms <= ts < ds.max_event_time_ms:
        return Rejection("out_of_range", f"{ds.event_time} {str(raw_time)[:40]} is outside the accepted range")
    event: dict[str, Any] = {"event_id": event_id, "event_time_ms": ts}
    for spec, name, kind, lo, hi, max_length in ds.field_checks:
        value = obj.get(name)
        t = type(value)
        # the common case, checked inline; anything else goes to _check_field, which has the last word
        if kind == "string":
            if t is str and 0 < len(value) <= max_length:
                event[name] = value
                continue
        elif kind == "float":
            if t is float or t is int:
                value = float(value)
                if lo <= value <= hi and value - value == 0.0:  # value - value is nan for +-inf
                    event[name] = value
                    continue
        elif t is int and lo <= value <= hi:
            event[name] = value
            continue
        checked = _check_field(spec, obj.get(name))
        if isinstance(checked, Rejection):
            return checked
        event[name] = checked
    return event


def _check_field(spec: FieldSpec, value: Any) -> Any:
    """One field's value, typed, or the reason it is refused (None stays None for a nullable field)."""
    if value is None:
        return None if spec.nullable else Rejection("missing_field", f"missing {spec.name}")
    if spec.type == "string":
        if not isinstance(value, str):
            return Rejection("wrong_type", f"{spec.name} must be a string, got {type(value).__name__}")
        if not value or len(value) > spec.max_length:
            return Rejection("out_of_range", f"{spec.name} must have 1..{spec.max_length} characters")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return Rejection("wrong_type", f"{spec.name} must be a number, got {type(value).__name__}")
    if spec.type == "int" and not (isinstance(value, int) or float(value).is_integer()):
        return Rejection("wrong_type", f"{spec.name} must be an integer")
    value = float(value) if spec.type == "float" else int(value)
    if not math.isfinite(value):
        return Rejection("not_finite", f"{spec.name} is {value}")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        return Rejection("out_of_range", f"{spec.name}={value} is outside [{spec.min}, {spec.max}]")
    return value


def validate(raw: bytes, ds: Dataset) -> dict[str, Any] | Rejection:
    """Bytes -> clean event, or the reason it was rejected."""
    obj = decode(raw)
    if isinstance(obj, Rejection):
        return obj
    return validate_record(obj, ds)


def validator(ds: Dataset) -> Callable[[bytes], dict[str, Any] | Rejection]:
    """``validate`` for one dataset, faster: a typed msgspec decoder checks the common record in C.

    The decoder is at least as strict as ``validate_record``: the same fields, types, lengths and ranges;
    unknown fields and numbers beyond a float's range refused. A record it refuses, or whose time is out of
    range or not a time, goes through ``validate``, which has the last word and gives the reason. So the
    result is always ``validate``'s (tests compare the two on valid, edge and broken records)."""
    struct = _record_struct(ds)
    if struct is None:
        return lambda raw: validate(raw, ds)  # a schema the decoder cannot state exactly: the plain path
    decode_struct = msgspec.json.Decoder(struct).decode
    asdict = msgspec.structs.asdict
    lo, hi = ds.min_event_time_ms, ds.max_event_time_ms

    def check(raw: bytes) -> dict[str, Any] | Rejection:
        if len(raw) > MAX_RECORD_BYTES:
            return validate(raw, ds)
        try:
            event = asdict(decode_struct(raw))
        except Exception:  # noqa: BLE001 (refused or not decodable: validate says why)
            return validate(raw, ds)
        ts = event["event_time_ms"]
        if type(ts) is not int:
            ts = event["event_time_ms"] = parse_event_time(ts)  # ISO-8601 text, as validate_record parses it
        if ts is None or not lo <= ts < hi:
            return validate(raw, ds)
        return event

    return check


_INT64 = (-(2**63), 2**63 - 1)  # what msgspec bounds can say; orjson (validate) reads exact ints in a wider range


def _record_struct(ds: Dataset) -> Any:
    """The msgspec Struct of a clean record, or None when the dataset has something it cannot state exactly:
    field names that are not identifiers or collide, bounds that are not finite, a float bound a float cannot
    hold, anything msgspec refuses. Int bounds are clamped to int64: a value beyond goes to ``validate``."""
    names = [f.name for f in ds.fields]
    sources = {ds.event_id, ds.event_time}
    if (
        any(not n.isidentifier() or keyword.iskeyword(n) for n in names)
        or {"event_id", "event_time_ms"} & set(names)
        or sources & set(names)
        or len(sources) < 2
    ):
        return None
    spec: list[tuple[Any, ...]] = [
        ("event_id", Annotated[str, msgspec.Meta(min_length=1, max_length=128)]),
        ("event_time_ms", int | str),
    ]
    for f in ds.fields:
        ends = {"ge": f.min, "le": f.max}
        if any(v is not None and (v != v or (f.type == "float" and math.isinf(v))) for v in ends.values()):
            return None  # nan, or an infinite float bound: validate_record's comparisons decide
        if f.type == "string":
            t: Any = Annotated[str, msgspec.Meta(min_length=1, max_length=f.max_length)]
        elif f.type == "float":
            if any(v is not None and float(v) != v for v in ends.values()):
                return None  # an int bound that a float rounds: msgspec would compare with the rounded one
            bounds = {k: float(v) for k, v in ends.items() if v is not None}
            t = Annotated[float, msgspec.Meta(**bounds)] if bounds else float  # msgspec refuses +-inf itself
        else:
            lo = _INT64[0] if f.min is None or f.min == -math.inf else max(_INT64[0], math.ceil(f.min))
            hi = _INT64[1] if f.max is None or f.max == math.inf else min(_INT64[1], math.floor(f.max))
            if lo > hi:
                return None
            t = Annotated[int, msgspec.Meta(ge=lo, le=hi)]
        spec.append((f.name, t | None, None) if f.nullable else (f.name, t))
    try:
        struct = msgspec.defstruct(
            f"{ds.name}_record",
            spec,
            rename={"event_id": ds.event_id, "event_time_ms": ds.event_time},
            forbid_unknown_fields=True,
            kw_only=True,
        )
        msgspec.json.Decoder(struct)
    except (TypeError, ValueError):
        return None
    return struct
