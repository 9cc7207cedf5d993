"""bench/batch: the nightly recompute's speed and memory on generated lake days of any size (issue 10).

    .venv/bin/python bench/batch/run.py [--sizes 1000000,4000000,16000000] [--archive] [--stages]
        [--baseline-ref REF --baseline-max 4000000] [--skip-warmup] [--out bench/results/batch.json]

Per size: a fresh home and database, a day landed straight in the lake (batchmark.generator.write_lake_day:
1% duplicates, 0.5% late, 1% lost; with --archive also the system of record as JSONL), one warm-up run whose
truth is then copied into stream.results (so every window has a stream value and the accuracy path runs), then
the timed run of this checkout and, up to --baseline-max events, of the code at --baseline-ref (a git worktree)
on the same day, and whether both wrote the same rows bit for bit (an md5 of every column's text). Memory:
psutil samples of the spark-submit process tree every 0.2 s (the JVM: driver and, on local[*], the executors;
the Python driver; the largest Python worker), and the CPU seconds of each (the JVM, the Python driver, all
Python workers together). Figures: job seconds (from the job's own clock, start-up excluded), events/s, the
marginal events/s between the two largest sizes, the time per event at each size (start-up subtracted), a
least-squares line job seconds = fixed + events x slope (the fixed in-job cost, and each size's time per event
without it), and with --stages the split by the job's prefixes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from batchmark import config, spark, storage  # noqa: E402
from batchmark.generator import GeneratorConfig, write_lake_day  # noqa: E402

DAY = date(2026, 11, 24)


def _sample(pid: int, peaks: dict[str, float], cpu: dict[int, tuple[str, float]], stop: threading.Event) -> None:
    """Every 0.2 s: peak memory per role, and each process's CPU seconds so far (the last sample of a Python
    worker that exits between samples is what it is counted with)."""
    while not stop.is_set():
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        jvm = driver = worker = 0
        for p in procs:
            try:
                rss, cmd, times = p.memory_info().rss, " ".join(p.cmdline()), p.cpu_times()
            except psutil.Error:
                continue
            if "java" in p.name():
                jvm += rss
                role = "jvm"
            elif "recompute.py" in cmd:
                driver = max(driver, rss)
                role = "python_driver"
            elif "python" in p.name():
                worker = max(worker, rss)
                role = "python_workers"
            else:
                role = "other"
            cpu[p.pid] = (role, times.user + times.system)
        for key, value in (("jvm_mb", jvm), ("python_driver_mb", driver), ("python_worker_mb", worker)):
            peaks[key] = max(peaks.get(key, 0), round(value / 2**20))
        stop.wait(0.2)


def run_job(
    settings: config.Settings, job: Path, run_id: str, extra: list[str], env_extra: dict, cwd: Path = ROOT
) -> dict:
    """One spark-submit of a recompute job, with its summary, wall time and peak memory."""
    env = {**spark.environment(settings), **env_extra}
    cmd = spark.command(settings, DAY, run_id, job=job, extra=extra)
    peaks: dict[str, float] = {}
    cpu: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, cpu, stop), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    result = spark.parse_result(DAY, proc.returncode, output)
    cpu_seconds: dict[str, float] = {}
    for role, seconds in cpu.values():
        cpu_seconds[role] = round(cpu_seconds.get(role, 0.0) + seconds, 1)
    return {**result, "wall_seconds": round(wall, 2), "peak_memory_mb": peaks, "cpu_seconds": cpu_seconds}


def baseline_python(tree: Path) -> Path:
    """A python that imports batchmark from the baseline's tree (executors do not inherit PYTHONPATH)."""
    wrapper = tree / ".bench-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{tree}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def stream_from_truth(url: str) -> int:
    """The stream's values := the truth, so the timed runs compute every window's accuracy."""
    with storage.transaction(url) as cur:
        cur.execute("DELETE FROM stream.results WHERE day = %s", (DAY,))
        cur.execute(
            """INSERT INTO stream.results (metric, group_key, window_start, window_end, day, value, n_events, detail)
               SELECT metric, group_key, window_start, window_end, day, value, n_events, detail
               FROM truth.results WHERE day = %s""",
            (DAY,),
        )
        return cur.rowcount


def fingerprint(url: str) -> str:
    """md5 of the day's truth and per-window accuracy, every column as text (float8 text is exact): two runs
    that wrote the same rows bit for bit have the same fingerprint."""
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT md5(string_agg(concat_ws(',', t.metric, t.group_key, t.window_start, t.window_end, t.value,
                                              t.n_events, t.detail, a.stream_value, a.error, a.n_lost, a.n_dup,
                                              a.n_late, a.lost_effect, a.dup_effect, a.late_effect, a.sketch_effect,
                                              a.detail), '|' ORDER BY t.metric, t.group_key, t.window_start))
               FROM truth.results t JOIN quality.window_accuracy a USING (metric, group_key, window_start)
               WHERE t.day = %s""",
            (DAY,),
        )
        return cur.fetchone()[0]


def fresh_database(url: str) -> None:
    storage.ensure_database(url)
    with storage.transaction(url) as cur:
        cur.execute("DROP SCHEMA IF EXISTS stream, truth, quality CASCADE")
    storage.init_schema(url)


def job_seconds(r: dict) -> float:
    """Seconds of the job without Spark's start-up (the baseline only reports both together, plus its write)."""
    if "job_seconds" in r:
        return float(r["job_seconds"])
    return float(r["spark_seconds"]) + float(r["write_seconds"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,4000000,16000000")
    ap.add_argument("--archive", action="store_true", help="also write and read the day's archive")
    ap.add_argument("--stages", action="store_true", help="time the job's prefixes too (runs the job 5 times)")
    ap.add_argument("--baseline-ref", default="", help="git ref of the code to compare with, e.g. eb11407")
    ap.add_argument("--baseline-max", type=int, default=4_000_000, help="largest day the baseline runs")
    ap.add_argument("--skip-warmup", action="store_true", help="no warm-up run: no stream values, no accuracy")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch.json"))
    ap.add_argument("--work", default="", help="where the days are written (default: a temporary directory)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-batch-"))
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/batchmark_bench_batch")
    baseline = None
    if args.baseline_ref:
        baseline = work / "baseline"
        if not baseline.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline_ref],
                           check=True, capture_output=True)  # fmt: skip
    runs = []
    try:
        for n in sizes:
            home = work / f"day-{n}"
            os.environ.update({"BATCHMARK_HOME": str(home), "DATABASE_URL": url})
            os.environ.pop("BATCHMARK_LAKE", None)
            os.environ.pop("BATCHMARK_ARCHIVE", None)
            settings = config.load()
            fresh_database(url)
            t = time.monotonic()
            counts = write_lake_day(
                GeneratorConfig(day=DAY, events=n, duplicates=0.01, late=0.005, lost=0.01),
                settings.events_lake,
                settings.archive_file(DAY) if args.archive else None,
            )
            print(f"{n:>11,} events: lake day written in {time.monotonic() - t:.1f} s {counts}", flush=True)
            row = {"events": n, "lake": counts}
            if not args.skip_warmup:
                row["warmup"] = run_job(settings, spark.JOB, f"warm-{n}", [], {})
                row["stream_windows"] = stream_from_truth(url)
            row["new"] = run_job(settings, spark.JOB, f"new-{n}", ["--stages"] if args.stages else [], {})
            row["new"]["fingerprint"] = fingerprint(url)
            print(f"{'':>11}  new: {json.dumps(row['new'])}", flush=True)
            if baseline is not None and n <= args.baseline_max:
                base = dataclasses.replace(  # its Python workers import the baseline's batchmark too
                    settings, spark=dataclasses.replace(settings.spark, python=str(baseline_python(baseline)))
                )
                row["baseline"] = run_job(
                    base, baseline / "batch" / "recompute.py", f"base-{n}", [], {"PYTHONPATH": str(baseline)}, baseline
                )  # run from its tree: a worker's sys.path starts with the working directory
                row["baseline"]["fingerprint"] = fingerprint(url)
                row["identical_to_baseline"] = row["baseline"]["fingerprint"] == row["new"]["fingerprint"]
                print(f"{'':>11}  baseline: {json.dumps(row['baseline'])}", flush=True)
            with storage.transaction(url) as cur:
                cur.execute("SELECT count(*), sum(n_events) FROM truth.results WHERE day = %s", (DAY,))
                row["truth_rows"], row["truth_n_events"] = cur.fetchone()
            runs.append(row)
    finally:
        if baseline is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    report = summarize(runs, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"written to {args.out}")
    return 0


def linear_fit(points: list[tuple[int, float]]) -> dict | None:
    """Least squares job seconds = fixed + slope * events: the fixed in-job cost (JIT compilation, Python
    workers starting, per-window work) and the cost per event, with each size's time per event once the fixed
    part is taken off (how linear the cost is)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    fixed = my - slope * mx
    per_event = {x: round(1e6 * (y - fixed) / x, 3) for x, y in points}
    return {
        "fixed_seconds": round(fixed, 2),
        "us_per_event": round(1e6 * slope, 3),
        "events_per_s": round(1 / slope) if slope > 0 else None,
        "us_per_event_without_fixed": per_event,
        "spread_without_fixed": round(max(per_event.values()) / min(per_event.values()) - 1, 3)
        if min(per_event.values()) > 0
        else None,
    }


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    table = []
    for r in runs:
        for code in ("new", "baseline"):
            if code not in r:
                continue
            x = r[code]
            secs = job_seconds(x)
            table.append(
                {
                    "code": code,
                    "events": r["events"],
                    "job_seconds": secs,
                    "startup_seconds": x.get("startup_seconds"),
                    "wall_seconds": x["wall_seconds"],
                    "events_per_s": round(r["events"] / secs),
                    "us_per_event": round(1e6 * secs / r["events"], 3),
                    "stages": x.get("stage_seconds") or {},
                    "peak_memory_mb": x["peak_memory_mb"],
                    "cpu_seconds": x.get("cpu_seconds", {}),
                    "rows": x.get("rows"),
                }
            )
    new = sorted((t for t in table if t["code"] == "new"), key=lambda t: t["events"])
    marginal = None
    if len(new) >= 2:
        a, b = new[-2], new[-1]
        marginal = round((b["events"] - a["events"]) / (b["job_seconds"] - a["job_seconds"]))
    per_event = [t["us_per_event"] for t in new]
    spread = round(max(per_event) / min(per_event) - 1, 3) if per_event else None
    fit = linear_fit([(t["events"], t["job_seconds"]) for t in new])
    ratios = {}  # on the whole recompute, start-up and the Postgres write included (the baseline's own clock)
    for r in runs:
        if "baseline" in r:
            total = {c: r[c]["spark_seconds"] + r[c]["write_seconds"] for c in ("new", "baseline")}
            ratios[r["events"]] = round(total["baseline"] / total["new"], 2)
    return {
        "identical_to_baseline": {r["events"]: r["identical_to_baseline"] for r in runs if "baseline" in r},
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30)},
        "table": table,
        "marginal_events_per_s": marginal,
        "per_event_spread": spread,  # max/min - 1 of the time per event (start-up excluded) across sizes
        "linear_fit": fit,  # job seconds = fixed + events * per event (least squares over the sizes)
        "cpu_seconds": {f"{t['code']}-{t['events']}": t["cpu_seconds"] for t in table},
        "speedup_vs_baseline": ratios,  # baseline job seconds / new job seconds, same day, same run
        "runs": runs,
    }


def print_table(report: dict) -> None:
    head = f"{'code':<9}{'events':>12}{'job s':>9}{'start s':>9}{'events/s':>12}{'us/event':>10}"
    print(f"\n{head}  memory MB (jvm/driver/worker)  CPU s (jvm/driver/workers)  stages")
    for t in report["table"]:
        m, c = t["peak_memory_mb"], t["cpu_seconds"]
        print(
            f"{t['code']:<9}{t['events']:>12,}{t['job_seconds']:>9.1f}{t['startup_seconds'] or 0:>9.1f}"
            f"{t['events_per_s']:>12,}{t['us_per_event']:>10.2f}  {m.get('jvm_mb')}/{m.get('python_driver_mb')}/"
            f"{m.get('python_worker_mb')}  {c.get('jvm')}/{c.get('python_driver')}/{c.get('python_workers')}"
            f"  {t['stages']}"
        )
    print(f"marginal events/s (two largest days): {report['marginal_events_per_s']}")
    print(f"job seconds = fixed + events x slope (least squares): {report['linear_fit']}")
    print(f"time per event, spread across sizes: {report['per_event_spread']}")
    print(f"speed-up against the baseline (same day, same run): {report['speedup_vs_baseline']}")
    print(f"truth and accuracy rows identical to the baseline's: {report['identical_to_baseline']}")


if __name__ == "__main__":
    sys.exit(main())
