"""The demo's own pieces: where its state lives, and waiting for a worker that became ready early."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchmark import config
from batchmark.demo import demo_home, log_size, wait_until_ready
from batchmark.errors import BatchmarkError

READY = b"[INFO] events consumer assigned partitions [0, 1]\n"


def test_a_ready_line_written_before_the_wait_is_seen(tmp_path: Path) -> None:
    """The demo starts the worker, then generates the day: a big day takes longer than the worker's join."""
    log = tmp_path / "worker.log"
    log.write_bytes(b"an earlier run's lines\n" + READY)  # a previous run was ready: that must not count
    start = log_size(log)
    worker = subprocess.Popen(["sleep", "30"])
    try:
        with log.open("ab") as fh:
            fh.write(b"starting\n" + READY)  # this run became ready while the day was being generated
        assert wait_until_ready(worker, log, timeout_s=5, since=start) < 1
        with pytest.raises(BatchmarkError, match="not ready within 1s"):  # reading from now on misses it
            wait_until_ready(worker, log, timeout_s=1)
    finally:
        worker.kill()
        worker.wait()


def test_the_demo_and_each_home_have_their_own_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    monkeypatch.setenv("BATCHMARK_HOME", str(tmp_path / "checkout-a" / ".batchmark"))
    a = config.load()
    monkeypatch.setenv("BATCHMARK_HOME", str(demo_home(a)))
    demo = config.load()
    monkeypatch.setenv("BATCHMARK_HOME", str(tmp_path / "checkout-b" / ".batchmark"))
    b = config.load()
    names = {s.database_url.rsplit("/", 1)[1] for s in (a, demo, b)}
    assert len(names) == 3 and all(n.startswith("batchmark_") for n in names)
    assert len({s.airflow_home for s in (a, demo, b)}) == 3
    assert len({s.lake for s in (a, demo, b)}) == 3
    assert config.load().database_url == b.database_url  # stable: the same home, the same database
