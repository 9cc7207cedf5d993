#!/usr/bin/env python
"""Summarize a py-spy collapsed-stack profile (`py-spy record --format raw`) of the product worker.

    .venv/bin/python bench/stream/profile_summary.py PROFILE.txt

Prints the share of samples per part of the per-record path: idle (waiting in select), the Faust/aiokafka/
asyncio machinery that delivers the records, and our code (validate, lake, engine.add by metric kind,
checkpoint), plus the top functions by self time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for f in stack.split(";"):
        m = FRAME.match(f)
        out.append((m["fn"], m["file"]) if m else (f, ""))
    return out


def category(fs: list[tuple[str, str]]) -> str:
    names = [fn for fn, _ in fs]
    files = [file for _, file in fs]
    joined = ";".join(f"{fn}@{file}" for fn, file in fs)
    if "StreamProcessor.checkpoint" in names:
        if "LakeWriter.flush" in names:
            return "ours: checkpoint / lake parquet flush"
        if any("psycopg2" in f or "storage.py" in f for f in files):
            return "ours: checkpoint / postgres"
        if "PartitionState.close_ready" in names:
            return "ours: checkpoint / close_ready (results)"
        return "ours: checkpoint / other"
    if "StreamProcessor.process" in names or "StreamProcessor.process_batch" in names:
        if {"validate", "validate_record", "decode", "validator.<locals>.check", "parse_event_time"} & set(names):
            return "ours: process / validate (msgspec + schema)"
        if "LakeWriter.add" in names or any(n.startswith("LakeWriter.add_many") for n in names):
            return "ours: process / lake.add"
        if any(n.startswith("PartitionState.add") for n in names):
            aggs = [fn for fn, file in fs if file.endswith("aggregates.py") or "sketch" in file]
            if aggs:
                return f"ours: process / engine.add / {aggs[0].split('.')[0]}"
            if any(fn.startswith("<lambda>") for fn in names):  # a field alone is an itemgetter: in add_batch
                return "ours: process / engine.add / value fns"
            return "ours: process / engine.add (windows, group keys, grouping)"
        if "dead_letter" in names:
            return "ours: process / dead letter"
        return "ours: process / other"
    if "BenchStats." in joined:
        return "bench instrumentation"
    if "StreamWorker.checkpoint" in names or "StreamWorker.idle_checkpoint" in names:
        return "ours: checkpoint / producer flush, kafka commit"
    if names and (names[-1] in ("select", "poll") or "selectors.py" in files[-1]):
        return "idle (select: waiting for the broker / timers)"
    if any("aiokafka" in f for f in files):
        return "aiokafka (fetch, decode record batches)"
    if any("/faust/" in f or f.startswith("faust/") for f in files):
        return "faust (its consumer, channel and agent stream; per batch since the aiokafka fetcher)"
    if any("/mode/" in f or f.startswith("mode/") for f in files):
        return "mode (service waits)"
    return "asyncio / other"


def main(path: str) -> None:
    cats: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    total = 0
    with open(path) as fh:
        lines = fh.readlines()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        n = int(n)
        fs = frames(stack)
        # the worker's main thread only (py-spy lists other threads' stacks too)
        total += n
        cats[category(fs)] += n
        if fs:
            self_fn[f"{fs[-1][0]} ({fs[-1][1]})"] += n
    print(f"{total} samples")
    for c, n in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"{100 * n / total:6.1f}%  {c}")
    print("\ntop self time:")
    for f, n in self_fn.most_common(25):
        print(f"{100 * n / total:6.1f}%  {f}")


if __name__ == "__main__":
    main(sys.argv[1])
