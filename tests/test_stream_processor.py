"""StreamProcessor in-process, against the real Postgres: offsets, re-delivery, seeks, checkpoints, restarts and
epochs, record by record (the subprocess fault tests drive the same code through Faust and a broker)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date
from pathlib import Path

import orjson

from batchmark import config, storage
from batchmark.definitions import load_definitions
from batchmark.stream_processor import Seek, StreamProcessor
from batchmark.windows import day_bounds_ms

DAY = date(2026, 7, 21)
START = day_bounds_ms(DAY)[0]


def _event(i: int) -> bytes:
    return orjson.dumps(
        {"event_id": f"sp-{i}", "event_time": START + i * 20_000, "tenant": f"t{i % 2}", "user": f"u{i % 5}",
         "job_id": f"j{i}", "cpu": 1.0 + i % 3, "mem_gb": 4.0, "duration_s": 5.0 + i}
    )  # fmt: skip


def _processor(tmp_path: Path, topic: str) -> StreamProcessor:
    settings = dataclasses.replace(config.load(), lake=tmp_path / "lake", events_topic=topic)
    return StreamProcessor(settings, load_definitions(settings.definitions_path), checkpoint_interval_s=0)


def _jobs(url: str) -> dict[tuple[str, int], float]:
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT group_key, window_start, value FROM stream.results WHERE day = %s AND metric = 'jobs'", (DAY,)
        )
        return {(g, int(w.timestamp() * 1000)): v for g, w, v in cur.fetchall()}


def _clear(url: str) -> None:
    with storage.transaction(url) as cur:
        cur.execute("DELETE FROM stream.results WHERE day = %s", (DAY,))


def test_re_deliveries_are_skipped_and_a_record_ahead_of_its_turn_asks_for_a_seek(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    proc = _processor(tmp_path, f"sp-{uuid.uuid4().hex[:6]}")
    assert proc.assign(0) is None  # no checkpoint: from the start
    for i in range(5):
        assert proc.process(0, i, b"t", _event(i)) is None
    assert proc.process(0, 2, b"t", _event(2)) is None  # a re-delivery below the position: skipped
    assert proc.counters.skipped == 1 and proc.counters.valid == 5
    assert proc.process(0, 7, b"t", _event(7)) == Seek(0, 5)  # ahead of its turn: go back to 5
    assert proc.process(0, 8, b"t", _event(8)) is None  # still waiting for 5 (within the grace): skipped
    for i in range(5, 9):
        assert proc.process(0, i, b"t", _event(i)) is None
    assert proc.counters.valid == 9  # every record folded once
    assert proc.process(3, 0, b"t", _event(0)) is None and proc.counters.skipped == 3  # not this worker's partition


def test_a_restart_resumes_from_the_checkpoint_and_counts_every_record_once(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    url = config.load().database_url
    _clear(url)
    topic = f"sp-{uuid.uuid4().hex[:6]}"
    one = _processor(tmp_path / "a", topic)  # the reference: one uninterrupted run
    one.assign(0)
    for i in range(40):
        one.process(0, i, b"t", _event(i))
    one.partitions[0].state.advance(START + 86_400_000)  # the day is over: every window closes
    one.checkpoint()
    reference = _jobs(url)
    assert sum(reference.values()) == 40
    _clear(url)

    topic = f"sp-{uuid.uuid4().hex[:6]}"
    first = _processor(tmp_path / "b", topic)
    first.assign(0)
    for i in range(25):
        first.process(0, i, b"t", _event(i))
    first.checkpoint()  # windows up to ~7 minutes are closed and written; later ones are still open
    resume, next_offset, _, epoch = storage.read_checkpoint(url, topic, 0)
    assert next_offset == 25 and resume < 25  # the open windows' first records are re-read after a restart
    for i in range(25, 30):
        first.process(0, i, b"t", _event(i))  # processed, never checkpointed: lost with the crash

    second = _processor(tmp_path / "b", topic)  # the restart
    assert second.assign(0) == resume
    for i in range(resume, 40):
        second.process(0, i, b"t", _event(i))
    assert second.counters.replayed == 25 - resume  # below the checkpoint: folded into open windows only
    second.partitions[0].state.advance(START + 86_400_000)
    second.checkpoint()
    assert _jobs(url) == reference  # the same results as the run that never stopped
    assert storage.read_checkpoint(url, topic, 0)[3] == epoch  # the same epoch


def test_dead_letters_are_counted_once_though_a_restart_sends_them_again(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    url = config.load().database_url
    topic = f"sp-{uuid.uuid4().hex[:6]}"
    first = _processor(tmp_path, topic)
    first.assign(0)
    first.process(0, 0, b"t", _event(0))
    assert first.process(0, 1, b"t", b'{"broken', START) is not None  # a dead letter, not yet checkpointed
    second = _processor(tmp_path, topic)  # crash before the checkpoint, restart
    second.assign(0)
    second.process(0, 0, b"t", _event(0))
    assert second.process(0, 1, b"t", b'{"broken', START) is not None  # sent to the DLQ again (at least once)
    second.checkpoint()
    second.checkpoint()
    with storage.transaction(url) as cur:
        cur.execute("SELECT day, reason, sum(records) FROM stream.rejections WHERE topic = %s GROUP BY 1, 2", (topic,))
        assert cur.fetchall() == [(DAY, "invalid_json", 1)]  # counted once, with the checkpoint


def test_a_lost_log_starts_a_new_epoch_and_keeps_what_was_written(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    url = config.load().database_url
    topic = f"sp-{uuid.uuid4().hex[:6]}"
    first = _processor(tmp_path, topic)
    first.assign(0)
    for i in range(10):
        first.process(0, i, b"t", _event(i))
    first.checkpoint()
    _, _, _, epoch = storage.read_checkpoint(url, topic, 0)

    kept = _processor(tmp_path, topic)
    assert kept.assign(0, log_lost=False) is not None  # the log still holds it: resume, same epoch
    assert kept.partitions[0].epoch == epoch and kept.counters.broker_resets == 0

    reset = _processor(tmp_path, topic)
    assert reset.assign(0, log_lost=True) is None  # the broker lost it: from the topic's beginning
    assert reset.partitions[0].epoch != epoch and reset.counters.broker_resets == 1
    assert reset.partitions[0].state.watermark_ms < START  # a new epoch's watermark starts over


def test_a_fetched_batch_is_handled_as_its_records_one_by_one(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    """process_batch (the worker's path) against process on each record: fetches with re-deliveries, a record
    ahead of its turn (a seek), dead letters (a tombstone among them), watermark punctuations, and records below
    the replay point. Outputs, counters, the open windows and the lake's buffer must be the same."""
    import random

    from batchmark.replay import WATERMARK_KEY
    from batchmark.stream_processor import DeadLetter, Record

    rng = random.Random(5)
    log: list[Record] = []
    for i in range(900):
        roll = rng.random()
        if roll < 0.03:
            value = rng.choice([b'{"broken', None, b"[1]", orjson.dumps({"event_id": "x"})])
        elif roll < 0.05:
            value = orjson.dumps({WATERMARK_KEY: START + i * 20_000 + rng.randrange(60_000)})
        else:
            value = _event(i if rng.random() < 0.9 else max(0, i - rng.randrange(400)))  # some arrive late
        log.append(Record(i, b"k", value, START + i))
    log[101] = Record(101, b"k", b'{"broken', START)
    # a seek after an admitted record, a record still ahead within the grace, a dead letter before a seek
    fetches, pos = [log[0:100], [log[100], log[103]], [log[104]], [log[101], log[103]], log[102:160]], 160
    while pos < len(log):
        n = rng.randrange(1, 120)
        fetch = log[pos : pos + n]
        if rng.random() < 0.15 and pos > 10:  # a re-delivery of records already handled, then the new ones
            fetch = log[pos - rng.randrange(1, 10) : pos] + fetch
        if rng.random() < 0.1 and len(fetch) > 3:  # a gap: the records after it come ahead of their turn
            fetches.append(fetch[:1] + fetch[3:])
            fetch = fetch[1:]  # the consumer went back: they come again in order
        fetches.append(fetch)
        pos += n
    procs = [_processor(tmp_path / str(k), f"spb-{k}-{uuid.uuid4().hex[:6]}") for k in range(2)]
    outs: list[list] = [[], []]
    for k, proc in enumerate(procs):
        proc.assign(0)
        proc.partitions[0].replay_until = 60  # as if the first 60 records were handled before a restart
        for fetch in fetches:
            if k == 0:
                outs[k] += [out for r in fetch if (out := proc.process(0, *r)) is not None]
            else:
                outs[k] += proc.process_batch(0, fetch)

    def comparable(out: object) -> object:
        if isinstance(out, DeadLetter):
            body = orjson.loads(out.value)
            return ("dead letter", out.key, body["reason"], body["offset"], body["raw_b64"])
        return out

    assert [comparable(o) for o in outs[1]] == [comparable(o) for o in outs[0]]
    scenario = [comparable(o) for o in outs[0] if not isinstance(o, DeadLetter) or orjson.loads(o.value)["offset"] > 99]
    assert scenario[:3] == [Seek(0, 101), ("dead letter", b"k", "invalid_json", 101, "eyJicm9rZW4="), Seek(0, 102)]
    assert len([o for o in outs[0] if isinstance(o, Seek)]) > 2 and sum(isinstance(o, DeadLetter) for o in outs[0]) > 10
    one, many = (p.partitions[0] for p in procs)
    assert dataclasses.asdict(procs[1].counters) == dataclasses.asdict(procs[0].counters)
    assert procs[0].counters.replayed > 0 and procs[0].counters.skipped > 0
    assert (many.position, many.next_offset, many.rejected) == (one.position, one.next_offset, one.rejected)
    assert many.lake._columns == one.lake._columns and len(one.lake._columns) > 0
    for st in (one.state, many.state):
        st.advance(START + 10**9)
    views = [sorted((r.metric, r.group_key, r.window_start_ms, r.n_events) for r in p.state.close_ready()[0])
             for p in (one, many)]  # fmt: skip
    assert views[0] == views[1] and len(views[0]) > 50
    assert sorted(one.state.late_counts()) == sorted(many.state.late_counts()) and one.state.late_events > 0
