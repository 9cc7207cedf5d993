"""The Kappa comparison: a stored day replayed into two versions of the streaming app, judged against its truth.

A batch dataset, once collected, never changes, so it is a benchmark. ``compare_versions`` replays a source (a
day of the lake -- its archive when there is one -- or a stored file) into a fresh topic, runs a worker per
version on it side by side (each its own consumer group, scratch database and runtime home, so neither touches
production), waits until both have consumed everything and closed every window, and then judges each version:

- truth and error per window: the core's ``window_accuracy`` (the function the nightly Spark job runs per group)
  over the replayed records, flagged by what each version's worker landed and the watermark each record met, so
  every window's error comes with its attribution (lost, duplicate, late, sketch);
- candidate against stable, per metric: the errors of the windows both have, paired; a two-sided exact sign test
  on the per-window differences (ties dropped) says better or worse at the 5% level, when the difference also
  matters: the mean error moved by more than 5% of max(tolerance, stable's mean error).
  (Randomized sketches -- KLL -- differ from run to run on the same input; the test alone would call such noise
  a difference in 5% of comparisons.) Otherwise: same;
- cost per version: events/s (first -> last record processed), worker CPU seconds per million events, peak RSS,
  state bytes per closed window, window close -> visible latency (p99).

Each version's results are stored under its label in ``stream.version_results`` (beside production's
``stream.results``), the per-window judgement in ``quality.version_windows``, one row per metric in
``quality.version_comparison`` and the run in ``quality.version_runs`` with its verdict line; the JSON is
written to ``$BATCHMARK_HOME/kappa/<run>/comparison.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import psycopg2.extras

from batchmark import storage
from batchmark.config import Settings
from batchmark.definitions import STABLE, Definitions, load_definitions
from batchmark.errors import BatchmarkError, ConfigError

log = logging.getLogger(__name__)
SIGNIFICANCE = 0.05  # a sign test below this p-value calls a difference better or worse ...
MIN_EFFECT = 0.05  # ... when the mean error moved by more than this share of max(tolerance, stable's mean error)
DAY_SOURCE = "day:"  # a source naming a day of the lake: day:2026-11-24 (or just the date)


# -- sources ---------------------------------------------------------------------------------------------------
def _day_of(source: str, settings: Settings) -> Any:
    """The day a source names (YYYY-MM-DD or day:YYYY-MM-DD), or None for a file."""
    from batchmark.windows import parse_day

    text = source.strip().removeprefix(DAY_SOURCE)
    if len(text) == 10 and text[4] == "-" and not Path(source.strip()).exists():
        return parse_day(text)
    return None


def check_source(settings: Settings, source: str) -> str:
    """What the source is, in words; refused with what to fix when it names nothing replayable."""
    from batchmark.lake import day_dir

    if not source.strip():
        raise ConfigError("give a source: a day of the lake (YYYY-MM-DD) or a stored file (.jsonl, .csv, .parquet)")
    day = _day_of(source, settings)
    if day is not None:
        archive = settings.archive_file(day)
        if archive.exists():
            return f"the archive of {day} ({archive})"
        files = sorted(day_dir(settings.events_lake, day).glob("*.parquet"))
        if not files:
            lake_dir = day_dir(settings.events_lake, day)
            raise ConfigError(f"no events for {day}: neither an archive ({archive}) nor lake files ({lake_dir})")
        return f"the lake's records of {day} ({len(files)} files), in arrival order"
    path = Path(source.strip()).expanduser()
    if not path.exists():
        raise ConfigError(f"source {source.strip()!r} is neither a day (YYYY-MM-DD) nor an existing file")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv", ".parquet"):
        raise ConfigError(f"source {path}: a stored file must be .jsonl, .csv or .parquet")
    return f"the file {path.resolve()}"


def resolve_source(settings: Settings, defs: Definitions, source: str, work: Path) -> tuple[Path, str]:
    """The file to replay and a description: a stored file as it is; a day, its archive (the system of record,
    the same bytes in the same order) when there is one, else the lake's records of the day in arrival order."""
    from batchmark.lake import day_dir

    described = check_source(settings, source)
    day = _day_of(source, settings)
    if day is None:
        return Path(source.strip()).expanduser().resolve(), described
    archive = settings.archive_file(day)
    if archive.exists():
        return archive, described
    out = work / f"lake-{day}.jsonl"
    _lake_to_jsonl(sorted(day_dir(settings.events_lake, day).glob("*.parquet")), defs, out)
    return out, described


def _lake_to_jsonl(files: list[Path], defs: Definitions, out: Path) -> int:
    """The lake's records as JSON lines, in the order the stream met them (epoch, partition, offset)."""
    import pyarrow.parquet as pq

    ds = defs.dataset
    frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    frame = frame.drop_duplicates(["_epoch", "_partition", "_offset"]).sort_values(["_epoch", "_partition", "_offset"])
    cols = [f.name for f in ds.fields]
    with open(out, "wb") as fh:
        for row in frame[["event_id", "event_time_ms", *cols]].itertuples(index=False):
            rec = {ds.event_id: row[0], ds.event_time: int(row[1])}
            rec.update({c: _plain(v) for c, v in zip(cols, row[2:], strict=True)})
            fh.write(orjson.dumps(rec) + b"\n")
    return len(frame)


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


# -- running the versions --------------------------------------------------------------------------------------
@dataclass
class VersionRun:
    """One version's worker in a comparison: where it writes, and what it cost."""

    label: str
    defs: Definitions
    database_url: str
    home: Path
    group: str
    env: dict[str, str]
    log: Path
    stats_file: Path
    proc: Any = None
    peak_rss: int = 0
    cost: dict[str, Any] = field(default_factory=dict)


def _scratch_url(url: str, run_id: str, label: str) -> str:
    import hashlib
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    tag = hashlib.sha256(label.encode()).hexdigest()[:6]
    name = f"{storage.db_name(url)[:40]}_k{run_id[-6:]}_{tag}_{label.replace('-', '_')}"[:63]
    return urlunsplit(parts._replace(path="/" + name))


def _prepare(
    settings: Settings, defs_by_label: dict[str, Definitions], run_id: str, topic: str, work: Path
) -> list[VersionRun]:
    runs = []
    for label, defs in defs_by_label.items():
        url = _scratch_url(settings.database_url, run_id, label)
        storage.drop_database(url)
        storage.ensure_database(url)
        storage.init_schema(url)
        home = work / label
        home.mkdir(parents=True, exist_ok=True)
        app_id = f"kappa-{run_id}-{label}"
        group = f"{app_id}-events"  # the fetcher's group; Faust's own group is the app id
        env = {
            "DATABASE_URL": url,
            "BATCHMARK_HOME": str(home),
            "BATCHMARK_LAKE": str(home / "lake"),
            "BATCHMARK_EVENTS_TOPIC": topic,
            "BATCHMARK_DLQ_TOPIC": f"{topic}.dlq",
            "BATCHMARK_CONSUMER_GROUP": group,
            "BATCHMARK_APP_ID": app_id,  # Faust's own group: production's worker never sees these join
            "BATCHMARK_DEFINITIONS": str(settings.definitions_path),
            "BATCHMARK_VERSION": label,
            "BATCHMARK_BENCH_STATS": str(home / "stats.json"),
            "BATCHMARK_STATE_BYTES": "1",
            "BATCHMARK_LIVE_INTERVAL_S": "0",  # no live rows: this is not production's live page
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "BATCHMARK_PARTITIONS": str(settings.partitions),
            **defs_by_label[label].version_spec(label).worker_env(),
        }
        runs.append(VersionRun(label, defs, url, home, group, env, home / "worker.log", home / "stats.json"))
    return runs


def _sample(runs: list[VersionRun]) -> None:
    import psutil

    for r in runs:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(r.proc.pid)
            procs = [p, *p.children(recursive=True)]
            r.peak_rss = max(r.peak_rss, sum(q.memory_info().rss for q in procs))


def _done(run: VersionRun, topic: str, partitions: int, end_watermark_ms: int) -> bool:
    """Whether the version's worker has processed every partition up to the replay's end-of-stream punctuation
    (so every window is closed and written)."""
    with storage.transaction(run.database_url) as cur:
        cur.execute("SELECT partition, watermark_ms FROM stream.checkpoints WHERE topic = %s", (topic,))
        marks = dict(cur.fetchall())
    return len(marks) == partitions and all(wm >= end_watermark_ms for wm in marks.values())


def _run_workers(
    settings: Settings, runs: list[VersionRun], topic: str, end_watermark_ms: int, timeout_s: float, replay: Any
) -> None:
    """Start the versions' workers and wait until both have closed every window; with `replay` (paced), send
    the records once both are ready, in a thread, while the workers are watched and sampled."""
    import threading

    from batchmark import demo

    for r in runs:
        r.proc = demo.start_worker(settings, r.log, env=r.env)
    try:
        for r in runs:
            demo.wait_until_ready(r.proc, r.log, since=0)
        failed: list[BaseException] = []
        sender = None
        if replay is not None:

            def send() -> None:
                try:
                    replay()
                except BaseException as exc:  # noqa: BLE001 - reported by the waiting loop
                    failed.append(exc)

            sender = threading.Thread(target=send, name="kappa-replay", daemon=True)
            sender.start()
        t0 = time.monotonic()
        pending = list(runs)
        while pending or (sender is not None and sender.is_alive()):
            _sample(runs)
            if failed:
                raise failed[0]
            for r in list(pending):
                if r.proc.poll() is not None:
                    raise BatchmarkError(
                        f"the worker of version {r.label!r} exited with {r.proc.returncode}; see {r.log}"
                    )
                if _done(r, topic, settings.partitions, end_watermark_ms):
                    pending.remove(r)
            if time.monotonic() - t0 > timeout_s:
                raise BatchmarkError(
                    f"versions {[r.label for r in pending]} had not closed every window after {timeout_s:.0f}s; "
                    f"see {', '.join(str(r.log) for r in pending)}"
                )
            time.sleep(0.2)
        if failed:
            raise failed[0]
        time.sleep(0.3)  # the stats file is written right after the commit the poll saw
        _sample(runs)
    finally:
        for r in runs:
            demo.stop(r.proc)


def _cost(run: VersionRun, events: int) -> dict[str, Any]:
    stats = json.loads(run.stats_file.read_text()) if run.stats_file.exists() else {}
    first, last = stats.get("first_wall"), stats.get("last_wall")
    seconds = (last - first) if first and last and last > first else None
    lat = sorted(stats.get("latencies_s") or [])
    sb = stats.get("state_bytes") or {}
    return {
        "events": events,
        "seconds": round(seconds, 3) if seconds else None,
        "events_per_s": round(events / seconds) if seconds else None,
        # the worker's own CPU time from its first fetched batch to its last commit (streaming/stats.py)
        "cpu_s_per_million": round(stats["cpu_s"] / events * 1e6, 2) if events and stats.get("cpu_s") else None,
        "peak_rss_mb": round(run.peak_rss / 2**20, 1),
        "close_to_visible_p99_s": round(float(np.percentile(lat, 99)), 3) if lat else None,
        "state_bytes_per_window": {m: round(b / n) for m, (b, n) in sorted(sb.items()) if n},
    }


# -- judging ---------------------------------------------------------------------------------------------------
def _flags(run: VersionRun, records: pd.DataFrame, defs: Definitions) -> pd.DataFrame:
    """The replayed records flagged by what this version's worker landed (batch_compute's FLAG_COLUMNS): the
    same rule the Spark job applies to the production lake, on one version's lake."""
    import pyarrow.parquet as pq

    from batchmark.batch_compute import NO_WATERMARK

    files = sorted((run.home / "lake" / "events").glob("date=*/*.parquet"))
    cols = ["event_id", "event_time_ms", *[f.name for f in defs.dataset.fields]]
    if files:
        lake = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        lake = lake.drop_duplicates(["_epoch", "_partition", "_offset"]).sort_values(
            ["_epoch", "_partition", "_offset"]
        )
        lake["_copy"] = lake.groupby("event_id").cumcount()
        lake = lake[[*cols, "_copy", "_watermark_ms"]].assign(_in_lake=True)
    else:
        lake = pd.DataFrame(columns=[*cols, "_copy", "_watermark_ms", "_in_lake"])
    landed = set(lake["event_id"])
    lost = records[~records["event_id"].isin(landed)][cols].assign(_copy=0, _watermark_ms=NO_WATERMARK, _in_lake=False)
    frame = pd.concat([lake, lost], ignore_index=True)
    frame["_in_truth"] = ~frame["_in_lake"].astype(bool) | (frame["_copy"] == 0)
    frame["_in_lake"] = frame["_in_lake"].astype(bool)
    frame["_copy"] = frame["_copy"].astype("int64")
    frame["_watermark_ms"] = frame["_watermark_ms"].astype("int64")
    return frame


def _valid_records(path: Path, defs: Definitions) -> pd.DataFrame:
    """The source's valid records (each event once: the truth set), as the engines see them."""
    from batchmark.events import Rejection, validate
    from batchmark.replay import read_records

    seen: set[str] = set()
    rows = []
    for raw in read_records(path, defs.dataset):
        event = validate(raw, defs.dataset)
        if isinstance(event, Rejection) or event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        rows.append(event)
    return pd.DataFrame(rows)


def _stream_values(run: VersionRun) -> dict[tuple[str, str, int], tuple[float, Any]]:
    with storage.transaction(run.database_url) as cur:
        cur.execute(
            """SELECT metric, group_key, (extract(epoch FROM window_start) * 1000)::bigint, value, detail
               FROM stream.results"""
        )
        return {(m, g, int(s)): (v, d) for m, g, s, v, d in cur.fetchall()}


def sign_test(differences: Iterable[float]) -> tuple[int, int, int, float]:
    """(worse, better, ties, two-sided p) of an exact sign test on paired differences (candidate - stable
    error per window): under 'no difference' a non-tied window is worse or better with probability 1/2."""
    worse = better = ties = 0
    for d in differences:
        if d > 0:
            worse += 1
        elif d < 0:
            better += 1
        else:
            ties += 1
    n = worse + better
    if n == 0:
        return worse, better, ties, 1.0
    # P(X <= k) for X ~ Binomial(n, 1/2), in log space (exact terms, no big integers): fast for any n
    k = min(worse, better)
    log_term = -n * math.log(2)  # C(n, 0) / 2^n
    logs = [log_term]
    for i in range(k):
        log_term += math.log(n - i) - math.log(i + 1)
        logs.append(log_term)
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return worse, better, ties, min(1.0, 2 * tail)


def _difference(a: float, b: float) -> float:
    """candidate error - stable error, with equal infinities (both unjudgeable) as a tie."""
    if a == b:
        return 0.0
    return a - b


@dataclass
class MetricComparison:
    """One metric, candidate against stable."""

    metric: str
    kind: str
    tolerance: float
    mostly: float  # the share of windows that must be within tolerance (the metric's GX check)
    windows: int  # windows both versions were judged on
    stable: dict[str, Any]
    candidate: dict[str, Any]
    worse_windows: int
    better_windows: int
    same_windows: int
    p_value: float
    verdict: str  # better, same, worse
    cause: str  # what the candidate's extra (or saved) error is attributed to


def _version_figures(frame: pd.DataFrame, tolerance: float) -> dict[str, Any]:
    err = frame["error"].astype(float)
    finite = err[np.isfinite(err)]
    return {
        "windows": len(frame),
        "missing": int(frame["stream_value"].isna().sum()),  # truth windows this version never wrote
        "max_error": float(err.max()) if len(err) else None,
        "mean_error": float(finite.mean()) if len(finite) else None,
        "within_tolerance": float((err <= tolerance).mean()) if len(err) else None,
        "n_late": int(frame["n_late"].fillna(0).sum()),
        "n_lost": int(frame["n_lost"].fillna(0).sum()),
        "n_dup": int(frame["n_dup"].fillna(0).sum()),
        "late_effect": float(frame["late_effect"].fillna(0).abs().sum()),
        "lost_effect": float(frame["lost_effect"].fillna(0).abs().sum()),
        "dup_effect": float(frame["dup_effect"].fillna(0).abs().sum()),
        "sketch_effect": float(frame["sketch_effect"].fillna(0).abs().sum()),
    }


CAUSES = (("late", "late events"), ("lost", "lost events"), ("dup", "duplicates"), ("sketch", "sketch error"))


def _cause(stable: dict[str, Any], candidate: dict[str, Any], verdict: str) -> str:
    """The attribution whose total moved most between the versions (events for late/lost/dup, value units for
    the sketch), named; 'none' when the versions are the same."""
    if verdict == "same":
        return "none"
    if candidate["missing"] != stable["missing"]:
        why = _cause({**stable, "missing": 0}, {**candidate, "missing": 0}, verdict)
        return f"{why}; windows missing {stable['missing']} -> {candidate['missing']}"
    moved = {
        name: abs(candidate[f"{key}_effect"] - stable[f"{key}_effect"])
        + (abs(candidate[f"n_{key}"] - stable[f"n_{key}"]) if key != "sketch" else 0)
        for key, name in CAUSES
    }
    best = max(moved, key=lambda k: moved[k])
    return best if moved[best] > 0 else "window values (no attribution moved)"


def judge(
    truth_by_label: dict[str, pd.DataFrame],
    stable: str,
    candidate: str,
    defs: Definitions,
    candidate_defs: Definitions | None = None,
) -> list[MetricComparison]:
    """Per metric: each version's figures and the paired sign test over the windows both have. The yardstick
    (tolerance, mostly) is the stable version's. A metric whose window differs between the versions is not
    paired (its windows are not the same windows): its verdict is 'not paired', judged on the figures alone."""
    out = []
    for m in defs.metrics:
        other = candidate_defs.metric(m.name) if candidate_defs else m
        frames = {}
        for label in (stable, candidate):
            f = truth_by_label[label]
            frames[label] = f[f["metric"] == m.name].set_index(["group_key", "window_start_ms"])
        s, c = frames[stable], frames[candidate]
        paired = other.window_ms == m.window_ms
        common = s.index.intersection(c.index) if paired else s.index[:0]
        diffs = [
            _difference(float(a), float(b)) for a, b in zip(c.loc[common, "error"], s.loc[common, "error"], strict=True)
        ]
        sf, cf = _version_figures(s, m.tolerance), _version_figures(c, m.tolerance)
        worse, better, ties, p = sign_test(diffs)
        verdict = _verdict(worse, better, p, sf, cf, m.tolerance) if paired else "not paired"
        out.append(
            MetricComparison(
                m.name,
                m.kind,
                m.tolerance,
                m.mostly,
                len(common),
                sf,
                cf,
                worse,
                better,
                ties,
                p,
                verdict,
                _cause(sf, cf, verdict),
            )
        )
    return out


def _verdict(worse: int, better: int, p: float, sf: dict[str, Any], cf: dict[str, Any], tolerance: float) -> str:
    """better / worse when the sign test says so (p < 0.05), the mean error moved the same way by more than
    MIN_EFFECT of max(tolerance, stable's mean error) and no more windows went missing the other way; 'mixed'
    when the window counts and the mean disagree; else 'same'. A version that lost windows is worse."""
    missing = cf["missing"] - sf["missing"]
    if missing:
        return "worse" if missing > 0 else "better"
    if worse + better == 0 or p >= SIGNIFICANCE:
        return "same"
    moved = (cf["mean_error"] or 0.0) - (sf["mean_error"] or 0.0)
    if abs(moved) <= MIN_EFFECT * max(tolerance, sf["mean_error"] or 0.0):
        return "same"
    if (worse > better) != (moved > 0):
        return "mixed"
    return "worse" if worse > better else "better"


def verdict_line(
    candidate: str, stable: str, comparisons: list[MetricComparison], costs: dict[str, dict[str, Any]]
) -> str:
    """'candidate X against stable: more accurate on A; worse on B (late events); same on 9; 1.3x the CPU'."""
    better = [c.metric for c in comparisons if c.verdict == "better"]
    worse = [
        f"{c.metric} ({c.cause}{', still within tolerance' if _passes(c.candidate, c.mostly) else ''})"
        for c in comparisons
        if c.verdict == "worse"
    ]
    same = [c.metric for c in comparisons if c.verdict == "same"]
    parts = []
    if better:
        parts.append("more accurate on " + ", ".join(better))
    if worse:
        parts.append("worse on " + ", ".join(worse))
    if same:
        parts.append(f"same on {'every metric' if not better and not worse else ', '.join(same)}")
    cs, cc = costs[stable].get("cpu_s_per_million"), costs[candidate].get("cpu_s_per_million")
    if cs and cc:
        parts.append(f"{cc / cs:.2f}x the CPU per event")
    ms, mc = costs[stable].get("peak_rss_mb"), costs[candidate].get("peak_rss_mb")
    if ms and mc:
        parts.append(f"{mc / ms:.2f}x the peak memory")
    return f"candidate {candidate!r} against {stable!r}: " + "; ".join(parts)


# -- the whole comparison --------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What compare_versions found: the run, each metric's comparison, each version's cost, the verdict line."""

    run_id: str
    source: str
    stable: str
    candidate: str
    events: int
    metrics: list[MetricComparison]
    costs: dict[str, dict[str, Any]]
    verdict: str
    changes: dict[str, str]
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d

    def table(self) -> str:
        """The comparison as a text table, one line per metric."""
        head = (
            f"{'metric':18} {'kind':9} {'windows':>7} {'stable max/mean err':>22} {'candidate max/mean err':>24} "
            f"{'within tol s/c':>15} {'w/b/=':>12} {'p':>8}  verdict"
        )
        lines = [head]
        for c in self.metrics:

            def e(fig: dict[str, Any]) -> str:
                mx, mn = fig["max_error"], fig["mean_error"]
                return f"{_g(mx)}/{_g(mn)}"

            lines.append(
                f"{c.metric:18} {c.kind:9} {c.windows:>7} {e(c.stable):>22} {e(c.candidate):>24} "
                f"{_share(c.stable) + '/' + _share(c.candidate):>15} "
                f"{f'{c.worse_windows}/{c.better_windows}/{c.same_windows}':>12} {c.p_value:>8.2g}  "
                f"{c.verdict}{'' if c.verdict == 'same' else f' ({c.cause})'}"
            )
        for label, cost in self.costs.items():
            lines.append(
                f"cost {label}: {cost.get('events_per_s') or '-'} events/s, {cost.get('cpu_s_per_million')} CPU-s per "
                f"1M events, peak RSS {cost.get('peak_rss_mb')} MB, "
                f"p99 close->visible {cost.get('close_to_visible_p99_s')} s"
            )
        sb = {label: cost.get("state_bytes_per_window") or {} for label, cost in self.costs.items()}
        s_sb, c_sb = sb.get(self.stable, {}), sb.get(self.candidate, {})
        moved = [f"{m} {s_sb[m]:,} -> {c_sb[m]:,}" for m in s_sb if m in c_sb and s_sb[m] != c_sb[m]]
        if moved:
            lines.append("state bytes per closed window, stable -> candidate: " + "; ".join(moved))
        return "\n".join(lines)


def _share(figures: dict[str, Any]) -> str:
    share = figures.get("within_tolerance")
    return "-" if share is None else f"{share:.0%}"


def _passes(figures: dict[str, Any], mostly: float) -> bool:
    """Whether a version's windows pass the metric's tolerance check (the share within tolerance >= mostly)."""
    share = figures.get("within_tolerance")
    return share is not None and share >= mostly - 1e-12


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def compare_versions(
    settings: Settings,
    source: str,
    candidate: str,
    stable: str = STABLE,
    rate: float | None = None,
    timeout_s: float = 1800,
    run_id: str | None = None,
    keep: bool = False,
) -> Comparison:
    """Replay `source` into a fresh topic, run `stable` and `candidate` on it side by side, judge both against
    the truth and store the comparison. Refuses unknown versions and sources with what to fix."""
    from batchmark.batch_compute import window_accuracy
    from batchmark.broker import create_topics
    from batchmark.replay import replay_async

    if stable == candidate:
        raise ConfigError(f"stable and candidate are both {stable!r}: compare two different versions")
    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be above 0 records/s (or empty for as fast as possible), not {rate}")
    base = load_definitions(settings.definitions_path)
    defs_by_label = {label: load_definitions(settings.definitions_path, version=label) for label in (stable, candidate)}
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    work = settings.home / "kappa" / run_id
    work.mkdir(parents=True, exist_ok=True)
    described = check_source(settings, source)
    topic = f"{settings.events_topic}.kappa.{run_id}"
    _record_run(settings, run_id, described, stable, candidate, topic, datetime.now(UTC))
    runs: list[VersionRun] = []
    try:  # from here on, whatever happens: the run is marked, and the scratch databases, topics, files go
        path, described = resolve_source(settings, base, source, work)
        create_topics(settings.bootstrap_servers, {topic: settings.partitions, f"{topic}.dlq": 1}, keyed=(topic,))
        runs = _prepare(settings, defs_by_label, run_id, topic, work)
        # the end-of-stream punctuation must close every window of both versions: the longer lateness decides
        slowest = max(defs_by_label.values(), key=lambda d: max(m.allowed_lateness_ms for m in d.metrics))
        end = _end_watermark_of(path, slowest)  # refuses a file with no usable event time, before any replay
        sent: dict[str, Any] = {}

        def do_replay() -> None:
            import asyncio

            sent["stats"] = asyncio.run(
                replay_async(path, settings.bootstrap_servers, topic, slowest, rate=rate, progress=False)
            )

        if rate is None:  # as fast as possible: the topic is full before the workers start, so events/s is theirs
            do_replay()
            _run_workers(settings, runs, topic, end, timeout_s, None)
        else:  # paced: the workers meet the records as a live stream
            _run_workers(settings, runs, topic, end, timeout_s, do_replay)
        events = sent["stats"].records
        records = _valid_records(path, base)
        truth_by_label, costs = {}, {}
        for r in runs:
            r.cost = costs[r.label] = _cost(r, events)
            stream = _stream_values(r)
            flagged = _flags(r, records, r.defs)
            judged = window_accuracy(flagged, list(r.defs.metrics), stream, r.defs.dataset.calendar)
            judged["error"] = judged["error"].astype(float)
            judged.loc[judged["stream_value"].isna(), "error"] = math.inf  # a window never written is all wrong
            truth_by_label[r.label] = judged
        comparisons = judge(truth_by_label, stable, candidate, defs_by_label[stable], defs_by_label[candidate])
        changes = {label: base.version_spec(label).changes() for label in (stable, candidate)}
        result = Comparison(
            run_id, described, stable, candidate, events, comparisons, costs,
            verdict_line(candidate, stable, comparisons, costs), changes,
        )  # fmt: skip
        result.path = work / "comparison.json"
        result.path.write_text(json.dumps(jsonable(result.to_json()), indent=1, default=str))
        _store(settings, result, runs, truth_by_label)
        return result
    except BaseException as exc:
        _finish_run(settings, run_id, "failed", str(exc)[:2000], None)
        raise
    finally:
        _clean_up(settings, runs, topic, work, keep)


def _clean_up(settings: Settings, runs: list[VersionRun], topic: str, work: Path, keep: bool) -> None:
    """Drop each scratch database, delete the run's topics, remove the lakes and the converted source; each on
    its own, so one failure does not leave the rest behind."""
    from batchmark import demo
    from batchmark.broker import delete_topics

    for r in runs:
        if r.proc is not None:
            with contextlib.suppress(Exception):
                demo.stop(r.proc)
        try:
            storage.drop_database(r.database_url)
        except Exception as exc:  # noqa: BLE001 - say what is left, go on with the rest
            log.warning("scratch database %s not dropped: %s", storage.db_name(r.database_url), exc)
        if not keep:
            shutil.rmtree(r.home / "lake", ignore_errors=True)
    try:
        delete_topics(settings.bootstrap_servers, [topic, f"{topic}.dlq"])
    except Exception as exc:  # noqa: BLE001
        log.warning("topics %s and %s.dlq not deleted: %s", topic, topic, exc)
    if not keep:
        for f in work.glob("lake-*.jsonl"):
            f.unlink(missing_ok=True)


def _end_watermark_of(path: Path, defs: Definitions) -> int:
    """The watermark the replayer's end-of-stream punctuation will carry for this file (replay.end_watermark)."""
    from batchmark.replay import end_of_stream_watermark, max_event_time

    return end_of_stream_watermark(max_event_time(path, defs), defs)  # the replayer sends exactly this


# -- storage ---------------------------------------------------------------------------------------------------
def _record_run(
    settings: Settings, run_id: str, source: str, stable: str, candidate: str, topic: str, started: datetime
) -> None:
    storage.init_schema(settings.database_url)
    with storage.transaction(settings.database_url) as cur:
        cur.execute(
            """INSERT INTO quality.version_runs (run_id, source, stable, candidate, topic, started_at, status)
               VALUES (%s, %s, %s, %s, %s, %s, 'running')""",
            (run_id, source, stable, candidate, topic, started),
        )


def _finish_run(settings: Settings, run_id: str, status: str, verdict: str, result: Comparison | None) -> None:
    with contextlib.suppress(Exception), storage.transaction(settings.database_url) as cur:
        cur.execute(
            """UPDATE quality.version_runs SET status = %s, verdict = %s, finished_at = now(),
                      events = %s, comparison = %s WHERE run_id = %s""",
            (
                status,
                verdict,
                result.events if result else None,
                psycopg2.extras.Json(jsonable(result.to_json()), dumps=lambda o: json.dumps(o, default=str))
                if result
                else None,
                run_id,
            ),
        )


def _store(
    settings: Settings, result: Comparison, runs: list[VersionRun], truth_by_label: dict[str, pd.DataFrame]
) -> None:
    """The versions' results under their labels, the per-window judgement and the per-metric comparison, in one
    transaction; then the run's verdict."""
    from batchmark.windows import ms_to_datetime

    with storage.transaction(settings.database_url) as cur:
        for r in runs:
            with storage.transaction(r.database_url) as src:
                src.execute(
                    "SELECT metric, group_key, window_start, window_end, day, value, n_events, detail"
                    " FROM stream.results"
                )
                rows = src.fetchall()
            psycopg2.extras.execute_values(
                cur,
                """INSERT INTO stream.version_results (run_id, label, metric, group_key, window_start, window_end, day,
                                                       value, n_events, detail) VALUES %s""",
                [
                    (result.run_id, r.label, *row[:7], psycopg2.extras.Json(row[7]) if row[7] is not None else None)
                    for row in rows
                ],
                page_size=2000,
            )
            f = truth_by_label[r.label]
            psycopg2.extras.execute_values(
                cur,
                """INSERT INTO quality.version_windows (run_id, label, metric, group_key, window_start, truth_value,
                       stream_value, error, n_lost, n_dup, n_late, sketch_effect) VALUES %s""",
                [
                    (
                        result.run_id,
                        r.label,
                        t.metric,
                        t.group_key,
                        ms_to_datetime(int(t.window_start_ms)),
                        _num(t.value),
                        _num(t.stream_value),
                        _num(t.error),
                        int(t.n_lost or 0),
                        int(t.n_dup or 0),
                        int(t.n_late or 0),
                        _num(t.sketch_effect),
                    )
                    for t in f.itertuples(index=False)
                ],  # fmt: skip
                page_size=2000,
            )
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO quality.version_comparison (run_id, metric, kind, windows, stable_max_error,
                   stable_mean_error, candidate_max_error, candidate_mean_error, worse_windows, better_windows,
                   same_windows, p_value, verdict, cause, figures) VALUES %s""",
            [
                (
                    result.run_id,
                    c.metric,
                    c.kind,
                    c.windows,
                    _num(c.stable["max_error"]),
                    _num(c.stable["mean_error"]),
                    _num(c.candidate["max_error"]),
                    _num(c.candidate["mean_error"]),
                    c.worse_windows,
                    c.better_windows,
                    c.same_windows,
                    c.p_value,
                    c.verdict,
                    c.cause,
                    psycopg2.extras.Json(jsonable({"stable": c.stable, "candidate": c.candidate})),
                )
                for c in result.metrics
            ],  # fmt: skip
        )
    _finish_run(settings, result.run_id, "done", result.verdict, result)


def jsonable(obj: Any) -> Any:
    """obj with every non-finite float as a string ('inf', '-inf') or None (NaN): JSON and jsonb refuse them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def latest(url: str, limit: int = 10) -> list[dict[str, Any]]:
    """The newest comparison runs (for reports): run, source, labels, status, verdict, when."""
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT run_id, source, stable, candidate, status, verdict, events, started_at, finished_at
               FROM quality.version_runs ORDER BY started_at DESC LIMIT %s""",
            (limit,),
        )
        names = [c.name for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
