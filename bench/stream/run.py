#!/usr/bin/env python
"""Stream throughput benchmark: the product's Faust worker vs two Faust baselines, on the same replayed input.

    .venv/bin/python bench/stream/run.py [--events N] [--partitions P] [--workers 1[,2]] [--out FILE.json]

1. starts its own embedded broker (Tansu, in memory) and uses its own databases (batchmark_bench[_i], or
   BENCH_DATABASE_URL) and a throwaway BATCHMARK_HOME (lake, logs) in a temp dir;
2. generates a fixed dataset (seeded): cluster-job events with event times in the last hour (Faust's windowed
   tables expire by wall clock), 5% out of order within the allowed lateness, ~1M distinct users;
3. replays it, keyed by tenant and stamped with event time, into a fresh topic for the product (plus the
   end-of-stream watermark punctuation) and one for the baselines, counting what went to each partition from
   the producer's record metadata (the broker's end offsets are wrong, see shared/STACK_FACTS.md);
4. runs the product (`faust -A streaming.app worker`) once per worker count in --workers, each run a fresh
   database and consumer group on the same topic, until stream.checkpoints.next_offset reaches the sent
   offsets on every partition; then the baselines, each with its own consumer group on their topic:
   - the textbook app (textbook_app.py: JSON models, group_by, two windowed tables, a forward per event) until
     it has aggregated every event, then it dumps its windowed tables;
   - plain Faust (plain_app.py: a do-nothing agent counting raw bytes), the ceiling of any Faust app here;
5. prints and writes JSON: events/s of each (first record processed -> last record processed, worker start and
   group join excluded), the product's ratio to each baseline and of each worker count to the first,
   window-close -> visible-in-Postgres latency percentiles (product), peak RSS, CPU seconds per million events;
   and PASS/FAIL: jobs and cpu_seconds per tenant per window equal in every product run, the textbook app and
   a direct computation from the dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from batchmark import storage  # noqa: E402
from batchmark.broker import EmbeddedBroker, create_topics  # noqa: E402
from batchmark.definitions import load_definitions  # noqa: E402
from batchmark.replay import watermark_record  # noqa: E402
from batchmark.windows import DAY_MS  # noqa: E402

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
WINDOW_MS = 60_000
CPUS = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
MEMS = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])


# -- dataset ----------------------------------------------------------------------------------------------
def generate(n: int, tenants: int, users: int, span_s: int, seed: int, end_ms: int) -> list[tuple[bytes, int, bytes]]:
    """n events as (key, event_time_ms, JSON bytes) in arrival order; same schema as batchmark.generator."""
    rng = np.random.default_rng(seed)
    start_ms = end_ms - span_s * 1000
    times = np.sort(rng.integers(start_ms, end_ms, size=n))
    w = 1.0 / np.arange(1, tenants + 1)
    tenant_ix = rng.choice(tenants, size=n, p=w / w.sum())
    user_ix = rng.integers(0, users, size=n)
    cpu = rng.choice(CPUS, size=n)
    mem = rng.choice(MEMS, size=n)
    duration = np.round(rng.lognormal(4.0, 1.2, size=n)).clip(1, 2_592_000)
    # 5% arrive up to 24 s late: out of order, but within the 30 s allowed lateness (so never dropped)
    delay = np.where(rng.random(n) < 0.05, rng.integers(1, 24_000, size=n), 0)
    order = np.lexsort((np.arange(n), times + delay))
    iso = np.datetime_as_string(times.astype("datetime64[ms]"), unit="ms")
    out = []
    for i in order.tolist():
        tenant = f"tenant-{tenant_ix[i]:02d}"
        rec = {
            "event_id": f"bench-{seed}-{i:09d}",
            "event_time": str(iso[i]) + "Z",
            "tenant": tenant,
            "user": f"user-{user_ix[i]:07d}",
            "job_id": f"job-{i:09d}",
            "cpu": float(cpu[i]),
            "mem_gb": float(mem[i]),
            "duration_s": float(duration[i]),
        }
        out.append((tenant.encode(), int(times[i]), orjson.dumps(rec)))
    return out


EXACT_KINDS = ("count", "sum", "mean", "min", "max")
TEXTBOOK_METRICS = ("jobs", "cpu_seconds")  # what the textbook app computes (count, sum of cpu * duration_s)


def exact_metrics(defs) -> list:  # noqa: ANN001
    """The definitions' metrics with an exact kind grouped by tenant only: checked against the dataset."""
    return [m for m in defs.metrics if m.kind in EXACT_KINDS and tuple(m.group_by) == ("tenant",)]


def expected_values(records: list[tuple[bytes, int, bytes]], metrics: list) -> dict[tuple[str, str, int], float]:
    """Every exact metric per (tenant, window), computed directly from the dataset (exact sums with fsum)."""
    parts: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for _, ts, raw in records:
        ev = orjson.loads(raw)
        for m in metrics:
            v = m.value_fn(ev) if m.value_fn is not None else 1.0
            parts[(m.name, ev["tenant"], ts - ts % m.window_ms)].append(v)
    kind = {m.name: m.kind for m in metrics}
    fold = {
        "count": lambda xs: float(len(xs)),
        "sum": math.fsum,
        "mean": lambda xs: math.fsum(xs) / len(xs),
        "min": lambda xs: float(min(xs)),
        "max": lambda xs: float(max(xs)),
    }
    return {k: fold[kind[k[0]]](xs) for k, xs in parts.items()}


def only(values: dict, names) -> dict:  # noqa: ANN001
    return {k: v for k, v in values.items() if k[0] in names}


async def produce(bootstrap: str, topic: str, records, punctuate_ms: int | None) -> dict[int, int]:
    """Send every record keyed by tenant with its event time; returns {partition: last offset + 1}."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks=1, request_timeout_ms=60000
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        pending = []

        def note(done) -> None:  # noqa: ANN001
            for md in done:
                ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)

        for key, ts, raw in records:
            pending.append(await producer.send(topic, raw, key=key, timestamp_ms=ts))
            if len(pending) >= 10_000:
                note(await asyncio.gather(*pending))
                pending.clear()
        note(await asyncio.gather(*pending))
        if punctuate_ms is not None:
            for p in sorted(await producer.partitions_for(topic)):
                md = await producer.send_and_wait(topic, watermark_record(punctuate_ms), partition=p)
                ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    finally:
        await producer.stop()
    return ends


# -- process sampling -------------------------------------------------------------------------------------
class Sampler:
    """RSS and CPU time of some processes, sampled every `every` seconds by the harness's loop."""

    def __init__(self, pids: list[int], every: float = 0.1) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.every = every
        self.samples: list[tuple[float, float, int]] = []  # (wall, cpu seconds, rss bytes), summed
        self._next = 0.0

    def sample(self, force: bool = False) -> None:
        now = time.time()
        if not force and now < self._next:
            return
        self._next = now + self.every
        cpu = rss = 0
        for p in self.procs:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        self.samples.append((now, cpu, rss))

    def cpu_between(self, t0: float, t1: float) -> float:
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        return after[0][1] - before[-1][1]

    @property
    def peak_rss(self) -> int:
        return max((s[2] for s in self.samples), default=0)


def _py_spy() -> str:
    return shutil.which("py-spy", path=f"{BIN}:{os.environ.get('PATH', '')}") or "py-spy"


def _log(path: Path):  # noqa: ANN202
    return open(path, "wb")  # noqa: SIM115 (the child process keeps it)


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE options (--product-env, --baseline-env) as a dict."""
    return {k: v for k, _, v in (kv.partition("=") for kv in pairs)}


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def fresh_database(url: str) -> None:
    """The bench's own database, with the product's schemas dropped and created again."""
    storage.ensure_database(url)
    with storage.transaction(url) as cur:
        cur.execute("DROP SCHEMA IF EXISTS stream, truth, quality CASCADE")
    storage.init_schema(url)


def start_product_worker(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """The product's worker, as `faust -A streaming.app worker` runs it, logging to `log`."""
    return subprocess.Popen(
        [str(BIN / "faust"), "-A", "streaming.app", "worker", "--without-web", "-l", "info"],
        cwd=cwd,
        env={**env, "PYTHONPATH": env.get("BENCH_PRODUCT_ROOT", str(REPO))},  # another checkout: --baseline-ref
        stdout=_log(log),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.array(xs)
    return {
        "n": len(xs),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


# -- the product ------------------------------------------------------------------------------------------
def run_product(
    work: Path,
    env: dict[str, str],
    ends: dict[int, int],
    n_events: int,
    workers: int,
    profile: str | None,
    timeout_s: float,
) -> tuple[dict, dict[tuple[str, str, int], float]]:
    url = env["DATABASE_URL"]
    procs, logs, stats_files = [], [], []
    for i in range(workers):
        wdir = work / f"product-w{i}"
        wdir.mkdir()
        stats_files.append(wdir / "stats.json")
        logs.append(wdir / "worker.log")
        procs.append(start_product_worker({**env, "BATCHMARK_BENCH_STATS": str(stats_files[-1])}, wdir, logs[-1]))
    sampler = Sampler([p.pid for p in procs])
    spy = None
    t_start = time.time()
    done_at = None
    last_poll = 0.0
    got: dict = {}
    try:
        while True:
            sampler.sample()
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"product worker exited with {p.returncode}; see {log}")
            if profile and spy is None and any(f.exists() for f in stats_files):
                spy = subprocess.Popen(
                    [
                        _py_spy(),
                        "record",
                        "--pid",
                        str(procs[0].pid),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--format",
                        "speedscope" if profile.endswith(".json") else "raw",
                        "-o",
                        profile,
                        "--duration",
                        "15",
                    ],
                    stdout=_log(work / "py-spy.log"),
                    stderr=subprocess.STDOUT,
                )
            if time.time() - last_poll >= 0.2:
                last_poll = time.time()
                with storage.transaction(url) as cur:
                    cur.execute(
                        "SELECT partition, next_offset FROM stream.checkpoints WHERE topic = %s",
                        (env["BATCHMARK_EVENTS_TOPIC"],),
                    )
                    got = dict(cur.fetchall())
                if all(got.get(p, 0) >= end for p, end in ends.items()):
                    done_at = time.time()
                    break
            if time.time() - t_start > timeout_s:
                raise RuntimeError(f"product not done after {timeout_s:.0f}s: checkpoints {got}, want {ends}")
            time.sleep(0.05)
        # the stats file is written right after the commit the poll saw
        stats = []
        deadline = time.time() + 5
        while time.time() < deadline:
            stats = [json.loads(f.read_text()) for f in stats_files if f.exists()]
            if sum(s["summary"]["processed"] for s in stats) >= n_events + len(ends):
                break
            time.sleep(0.05)
        sampler.sample(force=True)
        if spy is not None:
            spy.wait(60)
    finally:
        for p in procs:
            stop_proc(p)
    first = min(s["first_wall"] for s in stats)
    last = max(s["last_wall"] for s in stats)
    cpu = sampler.cpu_between(first, last)
    latencies = [x for s in stats for x in s["latencies_s"]]
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, (extract(epoch FROM window_start) * 1000)::bigint, value FROM stream.results"
        )
        values = {(m, g, int(ws)): float(v) for m, g, ws, v in cur.fetchall()}
        cur.execute("SELECT count(*), coalesce(sum(n_late), 0) FROM stream.late_events")
        late_rows, late_n = cur.fetchone()
    summary = [s["summary"] for s in stats]
    res = {
        "workers": workers,
        "events": n_events,
        "seconds": round(last - first, 3),
        "events_per_s": round(n_events / (last - first)),
        "seconds_to_durable": round(done_at - first, 3),
        "startup_s": round(first - t_start, 2),
        "latency_close_to_visible_s": percentiles(latencies),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "rss_at_end_mb": round(sampler.samples[-1][2] / 2**20, 1),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_million": round(cpu / n_events * 1e6, 1),
        # the cyclic GC inside that CPU (the stats file's gc.callbacks; a baseline from before them has none)
        "gc_s_per_million": (
            round(sum(x["gc_s"] for x in stats) / n_events * 1e6, 2) if all("gc_s" in x for x in stats) else None
        ),
        "gc_collections": [sum(x.get("gc_collections", [0, 0, 0])[g] for x in stats) for g in range(3)],
        "rejected": sum(s["rejected"] for s in summary),
        "late_events": int(late_n),
        "windows_written": sum(s["windows_written"] for s in summary),
        "checkpoints": sum(s["checkpoints"] for s in summary),
        "batches": sum(s["batches"] for s in stats),
        "settings": stats[0]["settings"],
        "logs": [str(x) for x in logs],
    }
    return res, values


# -- the textbook app -------------------------------------------------------------------------------------
def run_faust_baseline(
    script: str, work: Path, env: dict[str, str], n_events: int, timeout_s: float, dump: bool = True
) -> tuple[dict, dict]:
    """Run a baseline Faust app (textbook_app.py, plain_app.py) until it has handled every event; its figures and,
    with `dump`, its per-window values."""
    tdir = work / Path(script).stem
    tdir.mkdir()
    status, dump_file, request = tdir / "status.json", tdir / "dump.json", tdir / "dump.request"
    log = tdir / "worker.log"
    tenv = {**env, "BENCH_STATUS": str(status), "BENCH_DUMP": str(dump_file), "BENCH_DUMP_REQUEST": str(request)}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), "worker", "--without-web", "-l", "info"],
        cwd=tdir,
        env=tenv,
        stdout=_log(log),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sampler = Sampler([proc.pid])
    t_start = time.time()
    st: dict = {}
    try:
        while True:
            sampler.sample()
            if proc.poll() is not None:
                raise RuntimeError(f"{script} exited with {proc.returncode}; see {log}")
            if status.exists():
                try:
                    st = json.loads(status.read_text())
                except ValueError:
                    st = {}
                if st.get("aggregated", 0) >= n_events:
                    break
            if time.time() - t_start > timeout_s:
                raise RuntimeError(f"{script} not done after {timeout_s:.0f}s: {st}; see {log}")
            time.sleep(0.05)
        sampler.sample(force=True)
        rows = []
        if dump:
            request.touch()
            deadline = time.time() + 30
            while not dump_file.exists() and time.time() < deadline:
                time.sleep(0.1)
            rows = json.loads(dump_file.read_text())
    finally:
        stop_proc(proc)
    first, last = st["first_wall"], st["last_wall"]
    cpu = sampler.cpu_between(first, last)
    values = {(m, t, int(ws)): float(v) for m, t, ws, v in rows}
    res = {
        "workers": 1,
        "events": n_events,
        "seconds": round(last - first, 3),
        "events_per_s": round(n_events / (last - first)),
        "startup_s": round(first - t_start, 2),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "rss_at_end_mb": round(sampler.samples[-1][2] / 2**20, 1),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_million": round(cpu / n_events * 1e6, 1),
        "aggregated": st["aggregated"],
        "log": str(log),
    }
    return res, values


def compare(name: str, got: dict, want: dict) -> dict:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    ok = not (missing or extra or wrong)
    return {
        "what": name,
        "pass": ok,
        "windows": len(want),
        "missing": len(missing),
        "extra": len(extra),
        "different": len(wrong),
        "examples": [[list(k), got.get(k), want.get(k)] for k in (missing + extra + wrong)[:5]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=800_000)
    ap.add_argument(
        "--workers",
        default="1",
        help="product workers; a list (1,2) runs the product once per count on the same topic, in this order, "
        "each with its own database and consumer group (the baselines always run 1)",
    )
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--tenants", type=int, default=32)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--span-minutes", type=int, default=50, help="event times span the last N minutes")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-textbook", action="store_true", help="no textbook app (the slow baseline)")
    ap.add_argument("--skip-plain", action="store_true", help="no plain Faust agent (the ceiling of Faust)")
    ap.add_argument(
        "--product-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the product worker, e.g. BATCHMARK_TAKE_MAX=20000",
    )
    ap.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the --baseline-ref worker only, after --product-env (e.g. --baseline-ref HEAD "
        "--baseline-env BATCHMARK_GC_YOUNG=0: one knob against its default, same code, same run)",
    )
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record 15 s of the first product worker (FILE.json: speedscope, else collapsed stacks)",
    )
    ap.add_argument(
        "--baseline-ref",
        metavar="REF",
        help="also run the product of this commit (a git worktree, this venv), first, with the first worker "
        "count, on the same topic: before/after in one run",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stream.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, lake)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        ap.error(f"--workers takes worker counts separated by commas, e.g. 1,2; got {args.workers!r}")
    if any(w < 1 or w > args.partitions for w in worker_counts):
        ap.error(f"--workers: each count must be between 1 and --partitions ({args.partitions})")

    work = Path(tempfile.mkdtemp(prefix="bm-bench-stream-"))
    run_id = uuid.uuid4().hex[:6]
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/batchmark_bench")
    fresh_database(url)
    defs = load_definitions(REPO / "batchmark" / "metrics.toml")
    assert {m.name for m in defs.metrics} >= {"jobs", "cpu_seconds"}

    t = time.time()
    end_ms = int(t * 1000) - 120_000
    records = generate(args.events, args.tenants, args.users, args.span_minutes * 60, args.seed, end_ms)
    exact = exact_metrics(defs)
    want = expected_values(records, exact)
    n_windows = len(only(want, ("jobs",)))
    gen_s = time.time() - t
    print(f"generated {len(records):,} events ({n_windows:,} tenant-minutes) in {gen_s:.1f}s; work dir {work}")
    print(
        f"metrics: {len(defs.metrics)} ({', '.join(f'{m.name}:{m.kind}' for m in defs.metrics)}); "
        f"checked exactly: {', '.join(m.name for m in exact)}"
    )

    broker = EmbeddedBroker(log_path=work / "broker.log").start()
    result: dict = {}
    try:
        bootstrap = broker.bootstrap
        p_topic, t_topic = f"bench-{run_id}-events", f"bench-{run_id}-textbook-in"
        create_topics(
            bootstrap,
            {
                p_topic: args.partitions,
                p_topic + ".dlq": 1,
                t_topic: args.partitions,
                f"bench-{run_id}-textbook-out": args.partitions,
            },
        )
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)
        punct = (max(ts for _, ts, _ in records) // DAY_MS + 1) * DAY_MS + lateness
        t = time.time()
        p_ends = asyncio.run(produce(bootstrap, p_topic, records, punct))
        baselines = not (args.skip_textbook and args.skip_plain)
        t_ends = asyncio.run(produce(bootstrap, t_topic, records, None)) if baselines else {}
        print(f"replayed into fresh topics in {time.time() - t:.1f}s: product {p_ends}, textbook {t_ends}")
        broker_proc = psutil.Process(broker.proc.pid)

        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": url,
            "BATCHMARK_HOME": str(work / "home"),
            "BATCHMARK_EVENTS_TOPIC": p_topic,
            "BATCHMARK_DLQ_TOPIC": p_topic + ".dlq",
            "BATCHMARK_PARTITIONS": str(args.partitions),
        }
        env |= env_pairs(args.product_env)
        product_runs = []
        checks = []
        runs = [(workers, None) for workers in worker_counts]
        if args.baseline_ref:
            base_root = work / "baseline"
            git = ["git", "-C", str(REPO), "worktree"]
            subprocess.run([*git, "add", "-q", str(base_root), args.baseline_ref], check=True)
            runs.insert(0, (worker_counts[0], base_root))
        for i, (workers, root) in enumerate(runs):
            run_url = url if i == 0 else f"{url}_{i}"
            fresh_database(run_url)
            run_env = {
                **env,
                "DATABASE_URL": run_url,
                "BATCHMARK_HOME": str(work / f"home-{i}"),
                "BATCHMARK_CONSUMER_GROUP": f"bench-{run_id}-{i}",
            }
            if root is not None:
                run_env["BENCH_PRODUCT_ROOT"] = str(root)
                run_env |= env_pairs(args.baseline_env)
            b0 = sum(broker_proc.cpu_times()[:2])
            run_work = work / f"run-{i}"
            run_work.mkdir()
            prod, prod_values = run_product(
                run_work, run_env, p_ends, len(records), workers, args.profile if i == 0 else None, args.timeout
            )
            prod["broker_cpu_s"] = round(sum(broker_proc.cpu_times()[:2]) - b0, 2)
            label = f"baseline {args.baseline_ref}" if root is not None else "product"
            prod["code"] = args.baseline_ref if root is not None else "this checkout"
            if root is not None and args.baseline_env:
                prod["env"] = args.baseline_env
                prod["code"] += " " + " ".join(kv.removeprefix("BATCHMARK_") for kv in args.baseline_env)
            print(f"{label}, {workers} worker(s):  {prod['events_per_s']:,} events/s over {prod['seconds']}s")
            checks.append(compare(f"{label} ({workers}w) == dataset", only(prod_values, {m.name for m in exact}), want))
            if root is not None:
                baseline = prod
                continue
            product_runs.append(prod)
            if len(product_runs) == 1:
                first_values = prod_values
        prod = product_runs[0]
        if not args.baseline_ref:
            baseline = None
        tb = plain = None
        if not args.skip_textbook:
            tenv = {
                **os.environ,
                "BENCH_BROKER": f"kafka://{bootstrap}",
                "BENCH_APP_ID": f"textbook-{run_id}",
                "BENCH_IN_TOPIC": t_topic,
                "BENCH_OUT_TOPIC": f"bench-{run_id}-textbook-out",
                "BENCH_PARTITIONS": str(args.partitions),
            }
            b0 = sum(broker_proc.cpu_times()[:2])
            tb, tb_values = run_faust_baseline("textbook_app.py", work, tenv, len(records), args.timeout)
            tb["broker_cpu_s"] = round(sum(broker_proc.cpu_times()[:2]) - b0, 2)
            print(f"textbook: {tb['events_per_s']:,} events/s over {tb['seconds']}s")
            checks.append(compare("textbook == dataset", tb_values, only(want, TEXTBOOK_METRICS)))
            checks.append(compare("product == textbook", only(first_values, TEXTBOOK_METRICS), tb_values))
        if not args.skip_plain:
            penv = {
                **os.environ,
                "BENCH_BROKER": f"kafka://{bootstrap}",
                "BENCH_APP_ID": f"plain-{run_id}",
                "BENCH_IN_TOPIC": t_topic,
                "BENCH_PARTITIONS": str(args.partitions),
            }
            b0 = sum(broker_proc.cpu_times()[:2])
            plain, _ = run_faust_baseline("plain_app.py", work, penv, len(records), args.timeout, dump=False)
            plain["broker_cpu_s"] = round(sum(broker_proc.cpu_times()[:2]) - b0, 2)
            print(f"plain Faust: {plain['events_per_s']:,} events/s over {plain['seconds']}s")
        result = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "dataset": {
                "events": len(records),
                "tenants": args.tenants,
                "users": args.users,
                "span_minutes": args.span_minutes,
                "seed": args.seed,
                "tenant_minutes": n_windows,
                "metrics": [f"{m.name}:{m.kind}" for m in defs.metrics],
                "out_of_order": 0.05,
                "per_partition": {str(k): v for k, v in p_ends.items()},
            },
            "product": prod,
            "product_runs": product_runs,
            "baseline": baseline,
            "vs_baseline": {
                "throughput": round(prod["events_per_s"] / baseline["events_per_s"], 3),
                "cpu_per_event": round(prod["cpu_s_per_million"] / baseline["cpu_s_per_million"], 3),
            }
            if baseline
            else None,
            "textbook": tb,
            "plain_faust": plain,
            "ratio": round(prod["events_per_s"] / tb["events_per_s"], 2) if tb else None,
            "ratio_to_plain_faust": round(prod["events_per_s"] / plain["events_per_s"], 2) if plain else None,
            "scaling": [
                {
                    "workers": r["workers"],
                    "throughput_vs_first": round(r["events_per_s"] / prod["events_per_s"], 2),
                    "cpu_per_event_vs_first": round(r["cpu_s_per_million"] / prod["cpu_s_per_million"], 2),
                }
                for r in product_runs[1:]
            ],
            "exact_metrics_check": checks,
            "pass": all(c["pass"] for c in checks),
            "work_dir": str(work),
        }
    finally:
        broker.stop()
        if args.baseline_ref:
            git = ["git", "-C", str(REPO), "worktree"]
            subprocess.run([*git, "remove", "--force", str(work / "baseline")], check=False)
        if not args.keep and result:
            shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"written {out}")
    return 0 if result["pass"] else 1


def print_table(r: dict) -> None:
    runs = r.get("product_runs") or [r["product"]]
    cols = [(f"product {p['workers']}w", p) for p in runs]
    if r.get("baseline"):
        cols.insert(0, (f"{r['baseline']['code']} {r['baseline']['workers']}w", r["baseline"]))
    cols += [(name, r.get(key)) for name, key in (("textbook", "textbook"), ("plain Faust", "plain_faust"))]
    cols = [(name, c) for name, c in cols if c]

    def lat(c: dict) -> str:
        x = c.get("latency_close_to_visible_s")
        return f"{x['p50']}/{x['p90']}/{x['p99']}/{x['max']}" if x else "-"

    rows = [
        ("events", lambda c: f"{c['events']:,}"),
        ("processing s (first->last record)", lambda c: c["seconds"]),
        ("events/s", lambda c: f"{c['events_per_s']:,}"),
        ("peak RSS MB", lambda c: c["peak_rss_mb"]),
        ("worker CPU s / 1M events", lambda c: c["cpu_s_per_million"]),
        (
            "  of which cyclic GC s / 1M events",
            lambda c: "-" if c.get("gc_s_per_million") is None else c["gc_s_per_million"],
        ),
        ("broker CPU s (this run)", lambda c: c["broker_cpu_s"]),
        ("close->visible p50/p90/p99/max s", lat),
    ]
    print()
    print(f"{'':36}" + "".join(f"{name:>24}" for name, _ in cols))
    for label, get in rows:
        print(f"{label:36}" + "".join(f"{str(get(c)):>24}" for _, c in cols))
    if r.get("vs_baseline"):
        vs = r["vs_baseline"]
        print(f"product vs baseline: throughput x{vs['throughput']}, CPU per event x{vs['cpu_per_event']}")
    if r.get("ratio"):
        print(f"{'ratio product/textbook':36} {r['ratio']:>23}")
    if r.get("ratio_to_plain_faust"):
        print(f"{'ratio product/plain Faust':36} {r['ratio_to_plain_faust']:>23}")
    for sc in r.get("scaling", []):
        print(
            f"{sc['workers']} workers vs {runs[0]['workers']}: throughput x{sc['throughput_vs_first']}, "
            f"CPU per event x{sc['cpu_per_event_vs_first']}"
        )
    for c in r["exact_metrics_check"]:
        print(
            f"exact metrics {c['what']:24} {'PASS' if c['pass'] else 'FAIL'} "
            f"({c['windows']} windows, missing {c['missing']}, extra {c['extra']}, different {c['different']})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
