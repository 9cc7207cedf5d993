"""Accuracy benchmark: per metric kind, the stream's (online) error against the theoretical bound.

    .venv/bin/python bench/accuracy/run.py [--windows 200] [--out bench/results/accuracy.json]

For every metric of the definitions file it feeds the same generated windows to the metric's online form (what
the Faust worker runs) and its offline form (what the Spark job runs), and prints per metric: the accuracy
measure, its observed max / mean (and the share of windows within the bound), the bound theory gives (the
default tolerance), and the state memory per window (sketch serialized size). Written to a JSON file too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from batchmark import config
from batchmark.definitions import Metric, load_definitions


def window_values(metric: Metric, rng: np.random.Generator, items: str) -> list:
    """One window's inputs, sized so that sketches leave their exact mode (heavy-tailed, skewed keys)."""
    agg = metric.aggregate
    n = int(rng.integers(5_000, 40_000))
    if agg.input == "field":  # distinct users / heavy hitters: Zipf-skewed keys over a large population
        ranks = rng.zipf(1.3, size=n)
        return [f"user-{r}" for r in ranks]
    if metric.kind == "binpack":
        count = int(rng.integers(20, 2_000))
        if items == "uniform":  # sizes that do not divide the bin: where online First Fit pays
            return rng.uniform(1.0, 0.6 * agg.capacity, size=count).round(1).tolist()
        return rng.choice([0.5, 1, 2, 4, 8, 16, 32, 64], size=count).astype(float).tolist()  # the jobs' mem_gb
    return rng.lognormal(4.0, 1.2, size=n).round().tolist()


def bench_metric(metric: Metric, windows: int, seed: int, items: str = "domain") -> dict:
    from batchmark.aggregates import TopK

    agg = metric.aggregate
    rng = np.random.default_rng(seed)
    errors, sizes, extra = [], [], []
    for _ in range(windows):
        values = window_values(metric, rng, items)
        state = agg.new()
        for v in values:
            state = agg.add(state, v)
        value, detail = agg.result(state)
        errors.append(agg.error(value, detail, values))
        sizes.append(agg.state_bytes(state))
        if isinstance(agg, TopK):
            extra.append(agg.recall(detail, values)["recall"])
        elif metric.kind == "binpack":
            extra.append(value / agg.exact(values)[1]["lower_bound"])
    bound = metric.tolerance
    more = {}
    if extra:
        label = "recall_at_k" if isinstance(agg, TopK) else "ff_over_lower_bound"
        more = {f"{label}_min": min(extra), f"{label}_mean": statistics.fmean(extra), f"{label}_max": max(extra)}
    return {
        "metric": metric.name + ("" if items == "domain" else f" ({items} sizes)"),
        "kind": metric.kind,
        "measure": agg.error_name,
        "windows": windows,
        **more,
        "max_error": max(errors),
        "mean_error": statistics.fmean(errors),
        "within_bound": sum(e <= bound for e in errors) / windows,
        "bound": bound,
        "mostly": metric.mostly,
        "state_bytes_mean": statistics.fmean(sizes),
        "state_bytes_max": max(sizes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--definitions", default=None, help="definitions file (default: BATCHMARK_DEFINITIONS)")
    parser.add_argument("--out", default=str(config.REPO_ROOT / "bench" / "results" / "accuracy.json"))
    args = parser.parse_args()
    defs = load_definitions(args.definitions or config.load().definitions_path)
    t0 = time.monotonic()
    rows = [bench_metric(m, args.windows, seed=i) for i, m in enumerate(defs.metrics)]
    rows += [bench_metric(m, args.windows, seed=99, items="uniform") for m in defs.metrics if m.kind == "binpack"]
    header = f"{'metric':<30}{'kind':<10}{'measure':<34}{'max':>9}{'mean':>9}{'within':>8}{'bound':>8}{'bytes':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['metric']:<30}{r['kind']:<10}{r['measure']:<34}{r['max_error']:>9.4f}{r['mean_error']:>9.4f}"
            f"{r['within_bound']:>8.1%}{r['bound']:>8.4f}{r['state_bytes_max']:>8.0f}"
        )
    for r in rows:
        if "recall_at_k_mean" in r:
            print(f"{r['metric']}: recall@k min {r['recall_at_k_min']:.2f}, mean {r['recall_at_k_mean']:.3f}")
        if "ff_over_lower_bound_max" in r:
            print(
                f"{r['metric']}: FF / lower bound max {r['ff_over_lower_bound_max']:.3f}, "
                f"mean {r['ff_over_lower_bound_mean']:.3f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"windows": args.windows, "seconds": round(time.monotonic() - t0, 1), "metrics": rows}, indent=1)
    )
    print(f"\n{args.windows} windows per metric in {time.monotonic() - t0:.0f}s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
