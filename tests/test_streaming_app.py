"""The Faust app module builds its app without touching a service (the Faust CLI imports it to start a worker;
tests and tools may import it): the schema check and topic creation run when the worker starts."""

from __future__ import annotations

import os
import subprocess
import sys

from batchmark.broker import free_port
from batchmark.config import REPO_ROOT


def test_importing_the_app_touches_no_service() -> None:
    closed = free_port()  # nothing listens there: a connection attempt would fail
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/nowhere",
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}",
    }
    code = "import streaming.app as a; print(a.app.conf.id, a.EVENTS_GROUP, a.READY_LINE)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["batchmark-stream", "batchmark-stream-events"]


def test_worker_knobs_refuse_values_that_are_not_numbers_of_their_kind(monkeypatch) -> None:  # noqa: ANN001
    import pytest

    from batchmark.errors import ConfigError
    from streaming.worker import Knobs

    monkeypatch.setenv("BATCHMARK_GC_YOUNG", "0")
    monkeypatch.setenv("BATCHMARK_TAKE_WITHIN", "0.5")
    knobs = Knobs.from_env()
    assert (knobs.gc_young, knobs.take_within, knobs.take_max) == (0, 0.5, Knobs().take_max)
    refused = [("BATCHMARK_GC_YOUNG", "lots"), ("BATCHMARK_GC_YOUNG", "-1"), ("BATCHMARK_GC_YOUNG", str(2**31)),
               ("BATCHMARK_TAKE_MAX", "0"), ("BATCHMARK_TAKE_MAX", "1.5"), ("BATCHMARK_TAKE_WITHIN", "nan"),
               ("BATCHMARK_TAKE_WITHIN", "0"), ("BATCHMARK_TAKE_WITHIN", "inf"),  # 0: a fetch that never waits
               ("BATCHMARK_CHECKPOINT_INTERVAL_S", "inf"), ("BATCHMARK_MAX_FETCH_SIZE", "1")]  # fmt: skip
    for name, raw in refused:
        monkeypatch.setenv(name, raw)
        with pytest.raises(ConfigError, match=rf"{name}='{raw}' must be a (whole )?number from .* \(default "):
            Knobs.from_env()
        monkeypatch.delenv(name)


def test_the_worker_knobs_and_a_versions_worker_table_are_one_list_with_one_range_each() -> None:
    import dataclasses

    from batchmark.definitions import WORKER_KNOBS
    from streaming.worker import Knobs

    defaults = Knobs()
    assert set(WORKER_KNOBS) == {f.name for f in dataclasses.fields(Knobs)}
    assert all(knob.check(getattr(defaults, name)) is None for name, knob in WORKER_KNOBS.items())


def test_tune_gc_freezes_startup_objects_and_still_collects_cycles() -> None:
    """In a fresh interpreter (the GC is process-wide): the young threshold is raised, what existed is frozen, a
    reference cycle made afterwards is still collected by allocation alone; 0 leaves the GC as it was."""
    code = """
import gc, weakref
from streaming.worker import tune_gc
before = gc.get_threshold()
assert tune_gc(0) is False and gc.get_threshold() == before and gc.get_freeze_count() == 0
assert tune_gc(5000) is True
assert gc.get_threshold() == (5000, 20, 10) and gc.get_freeze_count() > 1000, gc.get_freeze_count()
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
keep = [[] for _ in range(20000)]  # allocations alone trigger young collections
print("collected" if gone() is None else "alive")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "collected", out.stderr
