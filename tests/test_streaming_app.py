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
