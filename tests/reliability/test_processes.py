"""What a person's signals do to `batchmark broker`: nothing of it may outlive it.

The Tansu broker is a child process in its own session (a Ctrl-C in the terminal must not reach it first), so
the parent has to stop it: on SIGTERM as on Ctrl-C, and -- through the kernel's parent-death signal -- even
when the parent itself is killed outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from batchmark.broker import free_port, port_open

BATCHMARK = str(Path(sys.executable).parent / "batchmark")


def _start_broker(home: Path) -> tuple[subprocess.Popen[str], int, list[psutil.Process]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["BATCHMARK_HOME"] = str(home)
    proc = subprocess.Popen(
        [BATCHMARK, "broker", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    line = proc.stdout.readline()
    assert f"embedded broker on 127.0.0.1:{port}" in line, line
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("tansu" in c.name() for c in children), [c.name() for c in children]
    assert port_open("127.0.0.1", port)
    return proc, port, children


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_batchmark_broker_stops_the_tansu_child(tmp_path: Path, sig: signal.Signals) -> None:
    proc, port, children = _start_broker(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [(p.pid, p.name()) for p in alive]
    assert not port_open("127.0.0.1", port)


def test_the_tansu_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    proc, port, children = _start_broker(tmp_path)
    proc.kill()  # SIGKILL: no handler runs in the parent
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [(p.pid, p.name()) for p in alive]
    deadline = time.monotonic() + 5
    while port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open("127.0.0.1", port)
