"""A corpus of malformed events through both engines: the same records rejected for the same reasons.

The stream dead-letters each bad record with its reason and keeps going; the Spark job, given the same file as
the day's archive, rejects exactly the same records by the same rules. Duplicate event ids are not malformed:
both engines accept them; the stream counts every copy, the batch counts the event once.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import date
from pathlib import Path

import orjson
import pytest

from batchmark import config, spark, storage
from batchmark.broker import ensure_settings_topics
from batchmark.definitions import load_definitions
from batchmark.demo import start_worker, stop, wait_for_day, wait_until_ready
from batchmark.replay import replay
from tests.integration.test_pipeline import _read_positions, _read_topic

DAY = date(2026, 11, 16)
pytestmark = pytest.mark.timeout(600)


def _event(i: int, **change: object) -> dict:
    minute = i % 1440
    return {
        "event_id": f"m-{i}",
        "event_time": f"2026-11-16T{minute // 60:02d}:{minute % 60:02d}:07.000Z",
        "tenant": f"tenant-{i % 3}",
        "user": f"u{i % 17}",
        "job_id": f"j{i}",
        "cpu": 2.0,
        "mem_gb": 4.0,
        "duration_s": 30.0,
        **change,
    }


def _corpus() -> list[tuple[str, bytes]]:
    """(expected reason, raw record) per class of malformed input, three of each."""
    bad = []
    for k in range(3):
        i = 10_000 + 20 * k
        good = orjson.dumps(_event(i))
        bad += [
            ("invalid_json", good[: len(good) // 2]),  # truncated
            ("wrong_type", orjson.dumps(_event(i + 1, cpu="2 cores"))),
            ("wrong_type", orjson.dumps(_event(i + 2, tenant=7))),
            ("missing_field", orjson.dumps({k2: v for k2, v in _event(i + 3).items() if k2 != "mem_gb"})),
            ("not_finite", orjson.dumps(_event(i + 4)).replace(b'"cpu":2.0', b'"cpu":NaN')),
            ("not_finite", orjson.dumps(_event(i + 5)).replace(b'"cpu":2.0', b'"cpu":Infinity')),
            ("out_of_range", orjson.dumps(_event(i + 6)).replace(b'"mem_gb":4.0', b'"mem_gb":' + b"9" * 60)),
            ("not_finite", orjson.dumps(_event(i + 7)).replace(b'"mem_gb":4.0', b'"mem_gb":1e999')),
            ("out_of_range", orjson.dumps(_event(i + 8, event_time="2999-01-01T00:00:00Z"))),  # far future
            ("out_of_range", orjson.dumps(_event(i + 9, event_time="1970-01-02T00:00:00Z"))),  # far past
            ("invalid_utf8", orjson.dumps(_event(i + 10)).replace(b'"u', b'"\xc3\x28u', 1)),
            ("too_large", orjson.dumps(_event(i + 11, job_id="j" * (1 << 20)))),  # a 1 MB record
            ("unknown_field", orjson.dumps(_event(i + 12, priority="high"))),
            ("not_an_object", b'["m-1", "2026-11-16T00:00:00Z"]'),
            ("bad_event_time", orjson.dumps(_event(i + 14, event_time="16/11/2026 10:00"))),
        ]
    return bad


def test_malformed_corpus_rejected_alike_by_stream_and_batch(pg_url: str, broker, home: Path) -> None:  # noqa: ANN001
    os.environ["BATCHMARK_EVENTS_TOPIC"], os.environ["BATCHMARK_DLQ_TOPIC"] = "malformed", "malformed.dlq"
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    ensure_settings_topics(settings)
    valid = [orjson.dumps(_event(i)) for i in range(600)]
    duplicates = [valid[5], valid[77]]  # sent twice: accepted by both; counted once by the batch
    corpus = _corpus()
    ordered = [v for i, v in enumerate(valid) for v in ([v, v] if i in (5, 77) else [v])]  # copies arrive on time
    lines = ordered[:300] + [raw for _, raw in corpus] + ordered[300:]
    data = home / "malformed.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    archive = settings.archive_file(DAY)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(data.read_bytes())  # the batch validates the very same bytes
    expected = Counter(reason for reason, _ in corpus)

    log = home / "worker-malformed.log"
    worker = start_worker(settings, log)
    try:
        wait_until_ready(worker, log)
        replay(data, settings.bootstrap_servers, settings.events_topic, defs, progress=False)
        wait_for_day(settings, DAY, max(m.allowed_lateness_ms for m in defs.metrics), worker, log, timeout_s=240)
        dead = asyncio.run(_read_topic(settings.bootstrap_servers, settings.dlq_topic, len(corpus)))
        assert worker.poll() is None  # it never stopped
    finally:
        stop(worker)

    assert Counter(d["reason"] for d in dead) == expected
    big = next(d for d in dead if d["reason"] == "too_large")
    assert big["raw_bytes"] > 1 << 20 and big["raw_truncated"] and len(big["raw_sha256"]) == 64
    jobs = sum(n for (m, _, _), (_, n) in storage.fetch_results(pg_url, "stream", DAY).items() if m == "jobs")
    assert jobs == len(valid) + len(duplicates)  # every valid record after and between the bad ones

    # the dead letters counted per day and reason in Postgres, once each; records without a usable event time are
    # stamped by the replayer with their neighbour's, so every one counts on the file's day
    with storage.transaction(pg_url) as cur:
        cur.execute("SELECT day, reason, sum(records) FROM stream.rejections WHERE topic = 'malformed' GROUP BY 1, 2")
        counted = cur.fetchall()
    assert {day for day, _, _ in counted} == {DAY}
    assert Counter({reason: int(n) for _, reason, n in counted}) == expected
    _dlq_command_lists_shows_and_redrives(settings, home, corpus)

    result = spark.submit(settings, DAY, "malformed")
    assert result["archive_rejected"] == dict(expected)  # the same records, for the same reasons
    with storage.transaction(pg_url) as cur:
        rejected = storage.day_rejections(cur, DAY, "malformed")
    assert rejected["archive"] == dict(expected) == rejected["stream"]  # each side saw the same records
    assert result["truth_events"] == len(valid)  # duplicates counted once
    assert result["rejected"] == {}  # nothing malformed ever reached the lake
    print(f"\nmalformed corpus: {dict(expected)}; DLQ {len(dead)}; batch rejected {result['archive_rejected']}")


def _dlq_command_lists_shows_and_redrives(settings, home: Path, corpus) -> None:  # noqa: ANN001
    """`batchmark dlq`: the list with reasons and safe previews, one letter whole, and a re-drive once the
    definitions accept the records (only those; each once; byte for byte)."""
    import contextlib
    import io

    from batchmark.cli import main

    def run(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["dlq", *args])
        return code, out.getvalue()

    code, text = run("--limit", "100")
    assert code == 0 and text.startswith(f"{len(corpus)} dead letters in malformed.dlq\n")
    assert "by reason: " in text and "unknown_field 3" in text and "too_large 3" in text
    code, text = run("--reason", "invalid_utf8")
    code, text = run("--show", text.splitlines()[3].split()[0])
    assert code == 0 and '"\\xc3(user":"u' in text  # invalid UTF-8 shown escaped, never raw
    code, text = run("--reason", "unknown_field")
    positions = [line.split()[0] for line in text.splitlines()[3:]]
    assert len(positions) == 3 and all("unknown field(s): priority" in line for line in text.splitlines()[3:])
    code, text = run("--show", positions[0])
    assert "reason   unknown_field: unknown field(s): priority" in text and "from     malformed partition" in text

    code, text = run("--reason", "unknown_field", "--redrive", "all")
    assert code == 1 and text.count("still rejected: unknown_field") == 3  # the definitions still refuse them
    fixed = home / "malformed-fixed.toml"
    base = settings.definitions_path.read_text()
    fixed.write_text(
        base.replace("[dataset.fields]\n", '[dataset.fields]\npriority = { type = "string", nullable = true }\n')
    )
    os.environ["BATCHMARK_DEFINITIONS"] = str(fixed)
    try:
        code, text = run("--reason", "unknown_field", "--redrive", "all")
        assert code == 0 and text.count("re-driven ") == 3 and "3 re-driven, 0 not" in text
        code, text = run("--reason", "unknown_field", "--redrive", "all")
        assert code == 1 and text.count("already re-driven") == 3  # never twice
        code, text = run("--reason", "wrong_type", "--redrive", "all")
        assert code == 1 and "0 re-driven, 6 not" in text
    finally:
        os.environ.pop("BATCHMARK_DEFINITIONS")
    code, text = run("--reason", "unknown_field")
    assert text.count("[re-driven]") == 3
    records = asyncio.run(_read_positions(settings.bootstrap_servers, "malformed", 10_000, timeout_s=5))
    raw = [r for r in records.values() if b'"priority":"high"' in r]
    assert len(raw) == 6  # the three originals and the three re-driven copies, same ids
    assert len({orjson.loads(r)["event_id"] for r in raw}) == 3
