"""The stream worker's core alone: StreamProcessor.process_batch on generated records in one process, no Kafka.

    .venv/bin/python bench/stream/core.py --events 200000 [--baseline-ref f00d123]

Times validate + land (buffered) + fold for every record of one generated day with the default definitions, best
of --repeats, and with --baseline-ref the same on that commit (checked out in a temporary git worktree, run in a
subprocess) in the same run, so the figure is a ratio on this shared machine. Prints records/s and writes
bench/results/stream_core.json. Needs a Postgres (DATABASE_URL or the default) for the partition's checkpoint row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BATCH = 10_000  # records per fetched batch: the worker's take_max default


def measure(root: Path, data: Path, repeats: int) -> dict[str, float]:
    """records/s of StreamProcessor.process in the checkout at `root` (imported from there)."""
    sys.path.insert(0, str(root))
    from batchmark import config, storage
    from batchmark.definitions import load_definitions
    from batchmark.stream_processor import StreamProcessor

    try:
        from batchmark.stream_processor import Record
    except ImportError:  # a baseline from before process_batch
        Record = None  # noqa: N806

    raws = data.read_bytes().splitlines()
    base = config.load()
    storage.ensure_database(base.database_url)
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as lake:
            settings = dataclasses.replace(base, lake=Path(lake), events_topic=f"bench-core-{uuid.uuid4().hex[:8]}")
            proc = StreamProcessor(settings, load_definitions(root / "batchmark" / "metrics.toml"))
            proc.assign(0)
            batched = hasattr(proc, "process_batch")  # a baseline before it: one record at a time
            records = [Record(offset, None, raw, None) for offset, raw in enumerate(raws)] if batched else []
            t = time.perf_counter()
            if batched:  # in fetched batches of the worker's default size, as the worker hands them over
                for i in range(0, len(records), BATCH):
                    proc.process_batch(0, records[i : i + BATCH])
            else:
                for offset, raw in enumerate(raws):
                    proc.process(0, offset, None, raw)
            best = min(best, time.perf_counter() - t)
    return {"records": len(raws), "seconds": round(best, 3), "records_per_s": round(len(raws) / best)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per round (best counts)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds alternating the checkouts")
    parser.add_argument("--baseline-ref", default=None, help="a commit to time in the same run (a git worktree)")
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)  # internal: time this checkout only
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.root:  # the subprocess for one checkout
        print(json.dumps(measure(Path(args.root), Path(args.data), args.repeats)))
        return 0

    sys.path.insert(0, str(ROOT))
    from batchmark.generator import GeneratorConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "day.jsonl"
        generate(GeneratorConfig(day=date(2026, 11, 24), events=args.events, malformed=0.001), data)
        roots = {"this checkout": ROOT}
        if args.baseline_ref:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", str(base), args.baseline_ref], check=True)
            roots[f"baseline {args.baseline_ref}"] = base
        results = {}
        try:
            for _ in range(args.rounds):  # alternating checkouts, so load from other jobs falls on both
                for name, root in roots.items():  # each in its own interpreter: its own batchmark package
                    cmd = [sys.executable, __file__, "--root", str(root), "--data", str(data)]
                    out = subprocess.run(
                        [*cmd, "--repeats", str(args.repeats)],
                        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(root)},
                    )  # fmt: skip
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    if name not in results or got["records_per_s"] > results[name]["records_per_s"]:
                        results[name] = got
            for name, got in results.items():
                print(f"{name}: {got['records_per_s']:,} records/s ({got['seconds']} s; best of {args.rounds} rounds)")
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    if len(results) == 2:
        ours, theirs = results.values()
        results["ratio"] = round(ours["records_per_s"] / theirs["records_per_s"], 3)
        print(f"ratio this checkout / baseline: {results['ratio']}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stream_core.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
