"""A worker's own statistics in a file: streaming.worker.WorkerHooks, installed by streaming.app when
BATCHMARK_BENCH_STATS names the file to write. bench/stream/run.py and the Kappa comparison (batchmark.kappa)
start their workers so: wall times of the first and last record, window close -> visible latency, the state
bytes of each closed window per metric, and the time the cyclic GC took.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import json
import os
import time
from typing import Any


class BenchStats:
    """Wall times: first/last record processed, window-close -> visible-in-Postgres latency; state bytes per window.

    A window closes when its partition's watermark passes its end plus the allowed lateness. The watermark only
    moves while the agent processes a batch, so the close time of a window is taken as the START of the batch
    that moved the watermark past it (an upper bound on the latency: the closing record was processed later in
    that batch). The row is visible when the checkpoint's Postgres transaction has committed.
    """

    def __init__(self, path: str, knobs: Any, state_bytes: bool = False) -> None:
        self.time = time.time
        self.state_bytes: dict[str, list[int]] | None = {} if state_bytes else None  # metric -> [bytes, windows]
        self.path = path
        self.knobs = knobs
        self.first_wall: float | None = None
        self.cpu0: float | None = None
        self.last_wall: float | None = None
        self.batches = 0
        self.records = 0
        self.t_batch = 0.0
        self.wm_before: dict[int, int] = {}
        self.history: dict[int, list[tuple[int, float]]] = {}  # partition -> [(watermark after, batch start)]
        self.latencies: list[float] = []
        self.seen: set[tuple[int, int, int]] = set()
        # the cyclic GC's time and collections per generation, from the first record on (gc.callbacks)
        self.gc_s = 0.0
        self.gc_runs = [0, 0, 0]
        self._gc_t0 = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if self.first_wall is None:
            return
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_t0
            self.gc_runs[info["generation"]] += 1

    def batch_start(self, processor: Any, n: int) -> None:
        self.t_batch = self.time()
        if self.first_wall is None:
            self.first_wall = self.t_batch
            self.cpu0 = time.process_time()  # the worker's CPU from here (start-up and group join excluded)
        self.batches += 1
        self.records += n
        self.wm_before = {p: rt.state.watermark_ms for p, rt in processor.partitions.items()}

    def batch_end(self, processor: Any) -> None:
        self.last_wall = self.time()
        for p, rt in processor.partitions.items():
            wm = rt.state.watermark_ms
            if wm != self.wm_before.get(p):
                self.history.setdefault(p, []).append((wm, self.t_batch))

    def closing(self, processor: Any) -> list[tuple[tuple[int, int, int], float]]:
        """(window, close time) of the windows the coming checkpoint will write; with state_bytes, also adds up
        the state each closing (window, group) holds, per metric."""
        out = []
        for p, rt in processor.partitions.items():
            hist = self.history.get(p, [])
            wm = rt.state.watermark_ms
            for i, ms in enumerate(rt.state.metrics):
                m = ms.metric
                for start in {k[0] for k in ms.windows}:
                    closes_at = rt.state.window_end(start, m.window_ms) + m.allowed_lateness_ms
                    if (p, i, start) in self.seen or wm < closes_at:
                        continue
                    if self.state_bytes is not None:
                        total = self.state_bytes.setdefault(m.name, [0, 0])
                        for (s, _), (state, n, _) in ms.windows.items():
                            if s == start and n:
                                total[0] += ms.agg.state_bytes(state)
                                total[1] += 1
                    j = bisect.bisect_left(hist, (closes_at, 0.0))
                    if j < len(hist):
                        out.append(((p, i, start), hist[j][1]))
        return out

    def committed(self, processor: Any, closed: list[tuple[tuple[int, int, int], float]] | None) -> None:
        now = self.time()
        for key, t in closed or ():
            self.seen.add(key)
            self.latencies.append(now - t)
        stats = {
            "pid": os.getpid(),
            "first_wall": self.first_wall,
            "last_wall": self.last_wall,
            "batches": self.batches,
            "records": self.records,
            "latencies_s": self.latencies,
            "cpu_s": time.process_time() - self.cpu0 if self.cpu0 is not None else None,
            "gc_s": self.gc_s,
            "gc_collections": self.gc_runs,
            "summary": processor.summary(),
            "state_bytes": self.state_bytes,
            "settings": dataclasses.asdict(self.knobs),
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(stats, fh)
        os.replace(tmp, self.path)
