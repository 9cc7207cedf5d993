#!/usr/bin/env python
"""Worker memory under a live source: a paced producer, a million distinct users, RSS sampled every second.

    .venv/bin/python bench/stream/memory.py [--minutes 10] [--rate 20000] [--users 1000000]
                                            [--out bench/results/stream-memory.json]

1. starts its own embedded broker, database (batchmark_bench_mem, or BENCH_MEM_DATABASE_URL) and BATCHMARK_HOME;
2. starts the product worker (`faust -A streaming.app worker`, default metrics, no bench instrumentation);
3. produces live events for --minutes at --rate events/s: event time = now, keyed by tenant (Zipf over 32),
   users drawn uniformly from --users ids (6M draws over 1M ids reach ~997k distinct);
4. samples the worker's RSS and CPU every second, and its progress from stream.checkpoints every 5 s;
5. prints RSS per minute and a verdict, and writes JSON: the samples, RSS per minute,
   the verdict below, events produced and processed, distinct users.

"Flat" here: the largest RSS of the last third of the run is within 5% of the largest RSS of the middle third,
and the least-squares slope over the second half is below 1% of the mean RSS per minute. The first third is
the warm-up: node_packing's 5-minute windows hold state in proportion to their events (First Fit keeps one
room per bin), so RSS saw-tooths with a 5-minute period and reaches its plateau after the first FULL 5-minute
window has closed (up to 10.5 minutes in); 20 minutes show the plateau better than 10. A leak of one Python
object per event (~50 bytes) would add ~60 MB per minute at 20k/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CPUS, MEMS, Sampler, fresh_database, start_product_worker, stop_proc  # noqa: E402

from batchmark import storage  # noqa: E402
from batchmark.broker import EmbeddedBroker, create_topics  # noqa: E402
from batchmark.demo import wait_until_ready  # noqa: E402


async def produce_live(bootstrap: str, topic: str, rate: int, seconds: float, users: int, seed: int) -> dict:
    """Send `rate` events per second for `seconds`, stamped with the current time; returns what was sent."""
    from aiokafka import AIOKafkaProducer

    rng = np.random.default_rng(seed)
    tenants = 32
    w = 1.0 / np.arange(1, tenants + 1)
    p = w / w.sum()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks=1)
    await producer.start()
    sent = 0
    seen_users = np.zeros(users, dtype=bool)
    t0 = time.time()
    tick = 0.05
    behind_max = 0.0
    try:
        while (now := time.time()) - t0 < seconds:
            due = int((now - t0) * rate) - sent  # paced by wall time: catches up if a tick ran late
            if due > 0:
                tenant_ix = rng.choice(tenants, size=due, p=p)
                user_ix = rng.integers(0, users, size=due)
                seen_users[user_ix] = True
                cpu = rng.choice(CPUS, size=due)
                mem = rng.choice(MEMS, size=due)
                duration = np.round(rng.lognormal(4.0, 1.2, size=due)).clip(1, 2_592_000)
                now_ms = int(now * 1000)
                iso = np.datetime_as_string(np.datetime64(now_ms, "ms"), unit="ms") + "Z"
                futures = []
                for i in range(due):
                    tenant = f"tenant-{tenant_ix[i]:02d}"
                    rec = {
                        "event_id": f"mem-{seed}-{sent + i:010d}",
                        "event_time": iso,
                        "tenant": tenant,
                        "user": f"user-{user_ix[i]:07d}",
                        "job_id": f"job-{sent + i:010d}",
                        "cpu": float(cpu[i]),
                        "mem_gb": float(mem[i]),
                        "duration_s": float(duration[i]),
                    }
                    futures.append(await producer.send(topic, orjson.dumps(rec), key=tenant.encode()))
                sent += due
                await asyncio.gather(*futures)
            behind_max = max(behind_max, (int((time.time() - t0) * rate) - sent) / rate)
            await asyncio.sleep(tick)
    finally:
        await producer.stop()
    return {
        "sent": sent,
        "seconds": round(time.time() - t0, 1),
        "distinct_users": int(seen_users.sum()),
        "producer_max_behind_s": round(behind_max, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=20_000, help="events per second produced")
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stream-memory.json"))
    args = ap.parse_args()
    if args.minutes < 10:
        print("note: under 10 minutes the run ends before node_packing's first full 5-minute window has closed")

    work = Path(tempfile.mkdtemp(prefix="bm-bench-memory-"))
    url = os.environ.get("BENCH_MEM_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/batchmark_bench_mem")
    fresh_database(url)
    broker = EmbeddedBroker(log_path=work / "broker.log").start()
    topic = "mem-events"
    worker = None
    try:
        create_topics(broker.bootstrap, {topic: args.partitions, topic + ".dlq": 1})
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "DATABASE_URL": url,
            "BATCHMARK_HOME": str(work / "home"),
            "BATCHMARK_EVENTS_TOPIC": topic,
            "BATCHMARK_DLQ_TOPIC": topic + ".dlq",
            "BATCHMARK_PARTITIONS": str(args.partitions),
        }
        env.pop("BATCHMARK_BENCH_STATS", None)
        log = work / "worker.log"
        worker = start_product_worker(env, work, log)
        wait_until_ready(worker, log)

        sampler = Sampler([worker.pid], every=1.0)
        progress: list[tuple[float, int]] = []
        seconds = args.minutes * 60

        async def watch(stop: asyncio.Event) -> None:
            last = 0.0
            while not stop.is_set():
                sampler.sample()
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode}; see {log}")
                if time.time() - last >= 5:
                    last = time.time()
                    with storage.transaction(url) as cur:
                        cur.execute("SELECT coalesce(sum(next_offset), 0) FROM stream.checkpoints")
                        progress.append((time.time(), int(cur.fetchone()[0])))
                await asyncio.sleep(0.2)

        async def run() -> dict:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            try:
                return await produce_live(broker.bootstrap, topic, args.rate, seconds, args.users, args.seed)
            finally:
                stop.set()
                await watcher

        t0 = time.time()
        produced = asyncio.run(run())
        sampler.sample(force=True)
    finally:
        if worker is not None:
            stop_proc(worker)
        broker.stop()

    samples = [(round(t - t0, 1), round(cpu, 2), round(rss / 2**20, 1)) for t, cpu, rss in sampler.samples]
    per_minute = {}
    for t, _, rss in samples:
        m = int(t // 60) + 1
        per_minute[m] = max(per_minute.get(m, 0.0), rss)
    third = seconds / 3
    half = [(t, rss) for t, _, rss in samples if t >= seconds / 2]
    slope = float(np.polyfit([t / 60 for t, _ in half], [r for _, r in half], 1)[0]) if len(half) > 10 else None
    mean_half = float(np.mean([r for _, r in half])) if half else None
    middle = max((rss for t, _, rss in samples if third <= t < 2 * third), default=None)
    last = max((rss for t, _, rss in samples if t >= 2 * third), default=None)
    growth = (last - middle) / middle if middle and last else None
    flat = growth is not None and slope is not None and growth < 0.05 and slope < 0.01 * mean_half
    processed = progress[-1][1] if progress else 0
    rate_in = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(progress, progress[1:], strict=False) if b[0] > a[0]]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "args": vars(args),
        "produced": produced,
        "processed_by_last_checkpoint": processed,
        "processed_per_s_median": round(float(np.median(rate_in))) if rate_in else None,
        "rss_mb_max_per_minute": per_minute,
        "rss_mb_max_middle_third": middle,
        "rss_mb_max_last_third": last,
        "growth_last_vs_middle_third": None if growth is None else round(growth, 4),
        "slope_mb_per_minute_second_half": None if slope is None else round(slope, 2),
        "flat": flat,
        "worker_cpu_s": round(samples[-1][1] - samples[0][1], 1) if samples else None,
        "samples": samples,
        "work_dir": str(work),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"produced {produced['sent']:,} events in {produced['seconds']}s ({produced['distinct_users']:,} users); "
          f"processed {processed:,} by the last checkpoint")  # fmt: skip
    print("worker RSS max per minute (MB): " + ", ".join(f"{m}: {v:.0f}" for m, v in per_minute.items()))
    print(
        f"max RSS middle third {middle} MB, last third {last} MB (growth {result['growth_last_vs_middle_third']}); "
        f"slope over the second half {result['slope_mb_per_minute_second_half']} MB/min -> "
        f"{'FLAT' if flat else 'NOT FLAT'}"
    )
    print(f"written {out}")
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
