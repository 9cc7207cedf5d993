"""Validation: every class of bad record gets its reason; good records come out typed."""

from __future__ import annotations

import orjson
import pytest

from batchmark.config import REPO_ROOT
from batchmark.definitions import load_definitions
from batchmark.events import Rejection, validate

DS = load_definitions(REPO_ROOT / "batchmark" / "metrics.toml").dataset
GOOD = {
    "event_id": "e1",
    "event_time": "2026-11-24T10:00:00.250Z",
    "tenant": "t1",
    "user": "u1",
    "job_id": "j1",
    "cpu": 2,
    "mem_gb": 4.5,
    "duration_s": 60,
}


def test_good_event_is_typed() -> None:
    ev = validate(orjson.dumps(GOOD), DS)
    assert ev == {
        "event_id": "e1",
        "event_time_ms": 1795514400250,
        "tenant": "t1",
        "user": "u1",
        "job_id": "j1",
        "cpu": 2.0,
        "mem_gb": 4.5,
        "duration_s": 60.0,
    }


def test_epoch_millis_event_time_is_accepted() -> None:
    ev = validate(orjson.dumps({**GOOD, "event_time": 1795514400250}), DS)
    assert ev["event_time_ms"] == 1795514400250


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (orjson.dumps(GOOD)[:-5], "invalid_json"),
        (b'{"event_id": "e1", "cpu": NaN}', "not_finite"),
        (orjson.dumps(GOOD).replace(b'"cpu":2', b'"cpu":-Infinity'), "not_finite"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "user"}), "missing_field"),
        (orjson.dumps({**GOOD, "cpu": "four"}), "wrong_type"),
        (orjson.dumps({**GOOD, "cpu": True}), "wrong_type"),
        (orjson.dumps({**GOOD, "duration_s": -1}), "out_of_range"),
        (orjson.dumps(GOOD).replace(b'"mem_gb":4.5', b'"mem_gb":' + b"9" * 40), "out_of_range"),
        (orjson.dumps(GOOD).replace(b'"mem_gb":4.5', b'"mem_gb":1e400'), "not_finite"),
        (orjson.dumps({**GOOD, "event_time": "2026-11-24 10:00"}), "bad_event_time"),
        (orjson.dumps({**GOOD, "event_time": "2600-01-01T00:00:00Z"}), "out_of_range"),
        (orjson.dumps({**GOOD, "extra": 1}), "unknown_field"),
        (orjson.dumps({**GOOD, "job_id": "x" * 1000}), "out_of_range"),
        (b'{"a": "' + b"x" * 70_000 + b'"}', "too_large"),
    ],
)
def test_bad_records_are_rejected_with_their_reason(raw: bytes, reason: str) -> None:
    result = validate(raw, DS)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_fast_path_agrees_with_the_full_field_check_on_every_kind_of_value() -> None:
    """validate_record checks the usual types inline; _check_field is the rule. They must never disagree."""
    import dataclasses
    import random

    from batchmark.definitions import FieldSpec
    from batchmark.events import _check_field, validate_record

    specs = (
        FieldSpec("s", "string", max_length=5),
        FieldSpec("f", "float", min=-2.0, max=3.5),
        FieldSpec("u", "float"),  # unbounded
        FieldSpec("i", "int", min=0, max=10),
    )
    ds = dataclasses.replace(DS, fields=specs)
    pool = [None, True, False, 0, 1, -1, 3, 10, 11, -3, 2**70, 0.0, -0.0, 2.5, 3.5, 3.6, -2.0, -2.1, 7.0, 1e308,
            float("inf"), float("-inf"), float("nan"), "", "a", "abcde", "abcdef", [], {}, "3"]  # fmt: skip
    rng = random.Random(3)
    for _ in range(3000):
        values = {s.name: rng.choice(pool) for s in specs}
        record = {"event_id": "e", "event_time": 1795514400250, **{k: v for k, v in values.items() if v is not None}}
        got = validate_record(record, ds)
        want: dict | Rejection = {"event_id": "e", "event_time_ms": 1795514400250}
        for s in specs:
            checked = _check_field(s, values[s.name])
            if isinstance(checked, Rejection):
                want = checked
                break
            want[s.name] = checked
        assert got == want and type(got) is type(want), (values, got, want)
        if isinstance(got, dict):
            assert [type(got[s.name]) for s in specs] == [str, float, float, int]


def test_validator_answers_as_validate_does_and_decodes_the_common_record_itself(monkeypatch) -> None:  # noqa: ANN001
    """The typed decoder behind the stream worker must give validate's exact answer (value, type, reason) on
    valid, edge and broken records, of the default dataset and of one with int, nullable and unbounded fields;
    and a plain valid record must not need validate at all (else the decoder is only a detour)."""
    import dataclasses
    import random

    from batchmark import events
    from batchmark.definitions import FieldSpec

    custom = dataclasses.replace(
        DS,
        event_id="id",
        event_time="ts",
        fields=(
            FieldSpec("k", "string", max_length=3),
            FieldSpec("n", "int", min=0.5, max=10),
            FieldSpec("big", "int"),
            FieldSpec("u", "float"),
            FieldSpec("opt", "float", min=0, max=1, nullable=True),
        ),
    )
    import json

    valid = {"k": ["a", "é" * 3], "n": [1, 10, 7], "big": [0, -1, 2**63, 2**70, 10**20 + 1, -(2**63) - 1],
             "u": [0.0, -0.0, 1e308, 3],
             "opt": [None, 0, 0.5, 1.0]}  # fmt: skip
    broken = [None, True, 11, -1, 0.5, 7.0, 1e400, float("nan"), "", "é" * 4, [], {}, "3"]
    rng = random.Random(11)
    corpus = [orjson.dumps(GOOD), orjson.dumps({**GOOD, "event_time": 1795514400250})]
    corpus += [raw for raw, _ in test_bad_records_are_rejected_with_their_reason.pytestmark[0].args[1]]
    corpus += [
        orjson.dumps({**GOOD, "event_time": t})
        for t in ("2026-11-24T10:00:00+02:00", "2026-11-24T10:00:00", "2026-11-24", "1999-12-31T23:59:59Z", 1.5e12)
    ]
    corpus += [b'{"event_id":"a",' + orjson.dumps(GOOD)[1:]]  # a key twice: the last one counts
    corpus += [b"", b"null", b"\xff", b" " + orjson.dumps(GOOD) + b" ", orjson.dumps(GOOD) + b"x", b'"\\ud800"']
    custom_corpus = []
    for _ in range(4000):
        record = {"id": rng.choice(["e", "e", "", "x" * 129, 7])}
        record["ts"] = rng.choice([1795514400250, "2026-11-24T10:00Z", "2026-11-24T10:00:00.250+01:00", 1.5, True])
        for name, good in valid.items():
            roll = rng.random()
            if roll < 0.9:
                record[name] = rng.choice(good)
            elif roll < 0.97:
                record[name] = rng.choice(broken)  # json writes inf and nan as Infinity and NaN: not JSON
        custom_corpus.append(json.dumps(record, ensure_ascii=rng.random() < 0.5).encode())
    valid_custom = json.dumps({"id": "e", "ts": 1795514400250, "k": "a", "n": 1, "big": 0, "u": 0.5}).encode()
    custom_corpus += [valid_custom.replace(b"0.5", x) for x in (b"1e400", b"-1e309", b"1e308", b"5e-324", b"1E2")]

    for ds, records in ((DS, corpus), (custom, custom_corpus)):
        fast = events.validator(ds)
        for raw in records:
            want = validate(raw, ds)
            got = fast(raw)
            assert got == want and type(got) is type(want), (raw, got, want)
            if isinstance(got, dict):
                assert list(got) == list(want), raw
                assert [type(v) for v in got.values()] == [type(v) for v in want.values()], raw
    accepted = sum(isinstance(validate(raw, custom), dict) for raw in custom_corpus)
    assert 300 < accepted < 3700  # the corpus reaches both sides

    calls = []
    real = events.validate
    monkeypatch.setattr(events, "validate", lambda raw, ds: calls.append(raw) or real(raw, ds))
    fast = events.validator(DS)
    assert fast(orjson.dumps(GOOD)) == real(orjson.dumps(GOOD), DS)
    assert fast(orjson.dumps({**GOOD, "event_time": 1795514400250}))["event_time_ms"] == 1795514400250
    assert calls == []
    assert isinstance(fast(orjson.dumps({**GOOD, "cpu": True})), Rejection) and len(calls) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"fields": "int1e19"},  # an int bound beyond int64
        {"fields": "float_inf"},  # an infinite float bound (valid TOML)
        {"fields": "float_unrepresentable"},  # an int bound of a float field that a float rounds
        {"event_id": "tenant"},  # the id is also a field
    ],
)
def test_validator_takes_the_plain_path_for_schemas_it_cannot_state(change: dict) -> None:
    """Definitions the typed decoder cannot express exactly still give a working validator (once, these made
    the worker fail at start-up), and it answers as validate does."""
    import dataclasses
    import json

    from batchmark import events
    from batchmark.definitions import FieldSpec

    kind = change.pop("fields", None)
    extra = {
        "int1e19": FieldSpec("n", "int", min=-1e20, max=1e19),
        "float_inf": FieldSpec("n", "float", min=0.0, max=float("inf")),
        "float_unrepresentable": FieldSpec("n", "float", min=9007199254740993),
        None: FieldSpec("n", "int", min=0),
    }[kind]
    ds = dataclasses.replace(DS, fields=(*DS.fields, dataclasses.replace(extra, nullable=True)), **change)
    fast = events.validator(ds)
    records = [{**GOOD, "n": v} for v in (0, 5, 9007199254740992, 9007199254740993.0, 10**19, 10**21, -1)]
    records += [{k: v for k, v in r.items() if k != "event_id"} | {ds.event_id: "e1"} for r in records]
    for record in records:
        raw = json.dumps(record).encode()  # writes ints beyond 64 bits too
        assert fast(raw) == validate(raw, ds), raw
