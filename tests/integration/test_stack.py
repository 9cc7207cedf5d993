"""The product as a person meets it in Airflow: `batchmark up`, then the UI in a real browser.

One stack for the module: `batchmark up` as a subprocess (its own BATCHMARK_HOME, database, broker port and UI
port), four generated days streamed into it through its own broker and Faust worker, then headless Chromium
(Debian's, driven by Playwright) logs in and triggers `nightly_recompute` from the trigger form. Checked: the
run succeeds while the scheduler's own run for yesterday waits in its sensor, validation follows through the
truth Asset, a backfill over three days validates three days in order, the viewer cannot trigger, every socket
the stack listens on is on loopback, a demo run beside the stack touches none of its state, and SIGTERM to
`batchmark up` leaves none of its processes behind. Screenshots go to .batchmark/test-artifacts/stack/.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import psutil
import pytest

from batchmark import storage
from batchmark.broker import free_port
from batchmark.config import REPO_ROOT, default_database_url
from batchmark.definitions import load_definitions
from batchmark.generator import GeneratorConfig, generate
from batchmark.lake import day_completeness
from batchmark.replay import replay
from batchmark.stack import READY_LINE

UI_DAY = date(2026, 3, 2)
BACKFILL_DAYS = [date(2026, 3, 3), date(2026, 3, 4), date(2026, 3, 5)]
FAULTY_DAY = BACKFILL_DAYS[-1]  # streamed with planted late, duplicated and lost events: its validation fails
FAULTS = {"late": 0.01, "duplicates": 0.01, "lost": 0.01}
DEMO_DAY = date(2026, 3, 6)
LIVE_DAY = date(2026, 3, 10)  # replayed while the live page watches (not the demo's day: the demo checks that)
ARTIFACTS = REPO_ROOT / ".batchmark" / "test-artifacts" / "stack"
CHROMIUM = os.environ.get("BATCHMARK_CHROMIUM", "/usr/bin/chromium")
BATCHMARK = str(Path(sys.executable).parent / "batchmark")


def _loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or loopback written as IPv4-mapped IPv6 (::ffff:127.0.0.1, as Java's sockets are)."""
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _db_url(pg_url: str, name: str) -> str:
    return pg_url.rsplit("/", 1)[0] + "/" + name


def _drop_database(url: str) -> None:
    """The database and, beside it, the Airflow metadata database `batchmark up` made for it (`<db>_airflow`)."""
    storage.drop_database(url)
    storage.drop_database(url.rsplit("/", 1)[0] + "/" + storage.db_name(url) + "_airflow")


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: none of the test session's Airflow, broker or database settings."""
    drop = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BATCHMARK_EVENTS_TOPIC", "BATCHMARK_DLQ_TOPIC")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in drop}
    env["BATCHMARK_HOME"] = str(home)
    return env


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _label(p: psutil.Process) -> str:
    """A process's command, for messages; a process that exited meanwhile (even a zombie not yet reaped by its
    parent, whose cmdline psutil refuses) is named by its pid."""
    try:
        return " ".join(p.cmdline()[1:3])[:40]
    except psutil.Error:
        return f"<pid {p.pid}, exited>"


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, line: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if line in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"`batchmark up` exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {line!r} within {timeout_s:.0f}s; see {log}")


class Api:
    """The Airflow REST API as the admin user."""

    def __init__(self, base: str, passwords: dict[str, str]) -> None:
        self.client = httpx.Client(base_url=base, timeout=15)
        self.passwords = passwords
        self.headers = self.login("admin")

    def login(self, user: str) -> dict[str, str]:
        r = self.client.post("/auth/token", json={"username": user, "password": self.passwords[user]})
        assert r.status_code in (200, 201), r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(path, params=params, headers=self.headers)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns", limit=100)["dag_runs"]

    def wait_for_runs(
        self, dag_id: str, match: Any, count: int, timeout_s: float, every: Any = None, may_fail: bool = False
    ) -> list[dict[str, Any]]:
        """Until `count` runs matching `match` have finished; fails on a failed one unless may_fail."""
        deadline = time.monotonic() + timeout_s
        done = ("success", "failed") if may_fail else ("success",)
        while time.monotonic() < deadline:
            runs = [r for r in self.runs(dag_id) if match(r)]
            failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
            assert may_fail or not failed, f"{dag_id} runs failed: {failed}"
            if every:
                every()
            if len(runs) >= count and all(r["state"] in done for r in runs):
                return runs
            time.sleep(3)
        pytest.fail(f"{dag_id}: {count} matching runs not done within {timeout_s:.0f}s: {self.runs(dag_id)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("stack-home")
    api_port, broker_port = free_port(), free_port()
    env = _clean_env(home)
    env["DATABASE_URL"] = _db_url(pg_url, storage.db_name(pg_url) + "_stack")
    log = home / "up.out"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [BATCHMARK, "up", "--port", str(api_port), "--broker-port", str(broker_port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        banner = _wait_for_line(proc, log, READY_LINE, timeout_s=300)
        up_s = time.monotonic() - t0
        print(f"\n`batchmark up` ready in {up_s:.1f}s:\n{banner}")
        assert f"http://127.0.0.1:{api_port}" in banner and "users: admin, viewer" in banner
        passwords_file = home / "airflow" / "simple_auth_manager_passwords.json.generated"
        assert str(passwords_file) in banner
        passwords = json.loads(passwords_file.read_text())

        # Four days, streamed the way a user does it: generated files replayed into the stack's broker.
        defs = load_definitions(REPO_ROOT / "batchmark" / "metrics.toml")
        for day in [UI_DAY, *BACKFILL_DAYS]:
            data = home / "data" / f"{day}.jsonl"
            faults = FAULTS if day == FAULTY_DAY else {}  # one day the stream gets wrong, on purpose
            generate(
                GeneratorConfig(day=day, events=4000, partitions=2, seed=day.day, **faults),
                data,
                archive=home / "archive" / f"events-{day}.jsonl",
            )
            replay(data, f"127.0.0.1:{broker_port}", "events", defs, progress=False)
        lateness = max(m.allowed_lateness_ms for m in defs.metrics)
        deadline = time.monotonic() + 120
        while not day_completeness(home / "lake" / "events", "events", BACKFILL_DAYS[-1], 2, lateness)[0]:
            assert time.monotonic() < deadline, "the stack's worker did not land the generated days"
            time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield {
            "proc": proc,
            "home": home,
            "env": env,
            "api_port": api_port,
            "broker_port": broker_port,
            "base": f"http://127.0.0.1:{api_port}",
            "api": Api(f"http://127.0.0.1:{api_port}", passwords),
            "passwords": passwords,
            "database_url": env["DATABASE_URL"],
            "up_s": up_s,
        }
    finally:
        if proc.poll() is None:
            for p in _tree(proc.pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        with contextlib.suppress(Exception):
            _drop_database(env["DATABASE_URL"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield b
        b.close()


@contextlib.contextmanager
def _page(browser: Any, stack: dict[str, Any], user: str) -> Iterator[Any]:
    """A logged-in page; any request that would leave 127.0.0.1 is blocked and fails the test."""
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    page = context.new_page()
    outside: list[str] = []

    def _route(route: Any) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    page.route("**/*", _route)
    page.goto(stack["base"] + "/")
    page.locator("input[name=username]").fill(user)
    page.locator("input[name=password]").fill(stack["passwords"][user])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(stack["base"] + "/", timeout=30_000)
    try:
        yield page
    finally:
        context.close()
    assert outside == [], f"the UI tried to leave the machine: {outside}"


# ------------------------------------------------------------------------------------------------ the tests


def test_loopback_judge() -> None:
    assert all(map(_loopback, ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(_loopback, ["0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5", "192.168.1.2"]))


def _listening(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of a process and its descendants."""
    found = set()
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
    return found


def test_every_listening_socket_is_on_loopback(stack: dict[str, Any]) -> None:
    """Read the sockets of every process `batchmark up` started (not the source text); the tasks' own processes
    (spark-submit and its JVM) are read while they run, in the backfill test."""
    listening = _listening(stack["proc"].pid)
    print("\nlistening sockets:", sorted(listening))
    assert {port for _, _, port in listening} >= {stack["api_port"], stack["broker_port"]}
    assert [s for s in listening if not _loopback(s[1])] == []
    # No log server (8793/8794) and no Faust web server (6066) anywhere.
    assert not {8793, 8794, 6066} & {port for _, _, port in listening}


def test_trigger_from_the_ui_while_a_scheduled_run_waits(stack: dict[str, Any], browser: Any) -> None:
    api: Api = stack["api"]
    assert api.get("/api/v2/dags/nightly_recompute")["is_paused"] is True  # Airflow's default for a new DAG
    with _page(browser, stack, "admin") as page:
        page.goto(stack["base"] + "/dags")
        page.get_by_text("validate_accuracy").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "01-dag-list.png"))
        page.goto(stack["base"] + "/dags/nightly_recompute")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        day_field = dialog.locator("input[name=element_date]")
        assert day_field.get_attribute("type") == "date"  # a date picker: only real days can be entered
        day_field.fill(UI_DAY.isoformat())
        page.screenshot(path=str(ARTIFACTS / "02-trigger-form.png"))
        t0 = time.monotonic()
        dialog.get_by_role("button", name="Trigger").click()

        scheduled_seen: list[dict[str, Any]] = []

        def _watch_scheduled() -> None:
            scheduled_seen.extend(r for r in api.runs("nightly_recompute") if r["run_type"] == "scheduled")

        manual = api.wait_for_runs(
            "nightly_recompute",
            lambda r: r["run_type"] == "manual",
            1,
            timeout_s=420,
            every=_watch_scheduled,
        )[0]
        ui_run_s = time.monotonic() - t0
        print(f"\nUI-triggered run {manual['dag_run_id']} succeeded {ui_run_s:.1f}s after the click")
        assert manual["dag_run_id"].startswith(f"manual__{UI_DAY.isoformat()}__")  # the day, in the runs list
        assert manual["note"] == f"recomputes {UI_DAY.isoformat()}"
        assert manual["conf"] == {"date": UI_DAY.isoformat()}

        page.goto(stack["base"] + "/dags/nightly_recompute/runs")
        row = page.get_by_role("row").filter(has_text=f"manual__{UI_DAY.isoformat()}")
        row.get_by_text("Success").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "03-runs-list.png"))
        page.goto(stack["base"] + f"/dags/nightly_recompute/runs/{manual['dag_run_id']}")
        page.get_by_text(f"recomputes {UI_DAY.isoformat()}").first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "04-run-grid.png"))

    assert len(storage.fetch_results(stack["database_url"], "truth", UI_DAY)) > 0
    # The form's "Unpause on trigger" started the schedule: the scheduler's run checks yesterday and waited
    # in its sensor the whole time the manual run went through.
    yesterday = datetime.now(tz=UTC).date() - timedelta(days=1)
    sched = {r["dag_run_id"]: r for r in api.runs("nightly_recompute") if r["run_type"] == "scheduled"}
    assert list(sched) == [f"scheduled__{yesterday.isoformat()}"], list(sched)
    run = sched[f"scheduled__{yesterday.isoformat()}"]
    assert run["logical_date"].startswith(yesterday.isoformat())
    assert run["note"] == f"recomputes {yesterday.isoformat()}"
    assert run["state"] == "running"
    assert scheduled_seen and all(r["state"] in ("queued", "running") for r in scheduled_seen)
    assert run["start_date"] < manual["end_date"]  # it was already waiting when the manual run finished
    sensor = api.get(f"/api/v2/dags/nightly_recompute/dagRuns/{run['dag_run_id']}/taskInstances/wait_for_lake_day")
    assert sensor["state"] in ("up_for_reschedule", "running", "queued", "scheduled"), sensor["state"]


def test_validation_follows_the_truth_asset(stack: dict[str, Any]) -> None:
    api: Api = stack["api"]
    runs = api.wait_for_runs("validate_accuracy", lambda r: UI_DAY.isoformat() in (r["note"] or ""), 1, 300)
    assert all(r["run_type"] == "asset_triggered" for r in runs)
    # the run's note (Markdown in the UI) links to the day in the Accuracy view
    assert f"[{UI_DAY}](/batchmark/accuracy?day={UI_DAY})" in runs[0]["note"]
    tis = api.get(f"/api/v2/dags/validate_accuracy/dagRuns/{runs[0]['dag_run_id']}/taskInstances")["task_instances"]
    labels = {(t["task_id"], t["rendered_map_index"]) for t in tis if t["map_index"] >= 0}
    assert labels == {
        ("validate_with_gx", UI_DAY.isoformat()),
        ("alert_on_drift", UI_DAY.isoformat()),
        ("check_accuracy", UI_DAY.isoformat()),
    }
    with storage.transaction(stack["database_url"]) as cur:
        cur.execute("SELECT count(*), bool_and(success) FROM quality.accuracy_history WHERE day = %s", (UI_DAY,))
        n, ok = cur.fetchone()
    assert n == len(load_definitions(REPO_ROOT / "batchmark" / "metrics.toml").metrics) and ok
    events = api.get("/api/v2/assets/events", source_dag_id="validate_accuracy")["asset_events"]
    assert {"day": UI_DAY.isoformat(), "success": True} in [e["extra"] for e in events]


def _report_page(stack: dict[str, Any], metric: str) -> str:
    """The newest validation page of a metric for UI_DAY (relative to the Data Docs root), once validated."""
    stack["api"].wait_for_runs("validate_accuracy", lambda r: UI_DAY.isoformat() in (r["note"] or ""), 1, 300)
    with storage.transaction(stack["database_url"]) as cur:
        cur.execute(
            """SELECT report_page FROM quality.accuracy_history WHERE day = %s AND metric = %s
               ORDER BY created_at DESC LIMIT 1""",
            (UI_DAY, metric),
        )
        (page,) = cur.fetchone()
    return page


def test_the_report_an_alert_links_to_is_served_by_the_api_server(stack: dict[str, Any]) -> None:
    """An alert's link is http://<api server>/batchmark/reports/<the metric's validation page>: it must open
    on any machine that reaches Airflow, not name a file on the scheduler's disk."""
    api: Api = stack["api"]
    page = _report_page(stack, "jobs")
    link = f"{stack['base']}/batchmark/reports/{page}"
    viewer = api.login("viewer")  # the read-only role may read reports
    response = httpx.get(link, headers=viewer, timeout=10)
    assert response.status_code == 200 and "accuracy_jobs" in response.text, link
    assert httpx.get(f"{stack['base']}/batchmark/reports/", headers=viewer, timeout=10).status_code == 200
    outside = f"{stack['base']}/batchmark/reports/%2e%2e/%2e%2e/pyproject.toml"
    assert httpx.get(outside, headers=viewer, timeout=10).status_code == 404
    # not signed in: a browser is sent to Airflow's login page (and back afterwards), anything else refused
    as_browser = httpx.get(link, headers={"Accept": "text/html"}, timeout=10)
    assert as_browser.status_code == 303
    assert as_browser.headers["location"].startswith("/auth/login?next=") and page in unquote(
        as_browser.headers["location"]
    )
    assert httpx.get(link, timeout=10).status_code == 401
    assert httpx.get(link, headers={"Authorization": "Bearer forged"}, timeout=10).status_code in (401, 403)


def test_an_alert_link_opens_the_report_in_a_browser_after_signing_in(stack: dict[str, Any], browser: Any) -> None:
    """A person clicks an alert's link with no Airflow session: the login page, then the report itself, all
    from 127.0.0.1 (the Data Docs load vendored assets only)."""
    link = f"{stack['base']}/batchmark/reports/{_report_page(stack, 'cpu_seconds')}"
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    outside: list[str] = []

    def _route(route: Any) -> None:
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", _route)
    try:
        page.goto(link)
        page.locator("input[name=username]").fill("viewer")
        page.locator("input[name=password]").fill(stack["passwords"]["viewer"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(link, timeout=30_000)
        page.get_by_text("accuracy_cpu_seconds").first.wait_for(timeout=15_000)
        assert page.evaluate("typeof jQuery === 'function'")  # the vendored scripts ran
        page.screenshot(path=str(ARTIFACTS / "alert-link-report.png"))
    finally:
        context.close()
    assert outside == [], f"the report tried to leave the machine: {outside}"


def test_a_date_that_is_not_a_day_is_refused_before_a_run(stack: dict[str, Any]) -> None:
    api: Api = stack["api"]
    before = len(api.runs("nightly_recompute"))
    for bad in ("2026-02-30", "2025-02-29", "2026-13-01"):
        r = api.client.post(
            "/api/v2/dags/nightly_recompute/dagRuns",
            json={"conf": {"date": bad}, "logical_date": None},
            headers=api.headers,
        )
        assert r.status_code == 400 and "is not a 'date'" in r.text, (bad, r.status_code, r.text)
    assert len(api.runs("nightly_recompute")) == before


def test_a_configuration_error_fails_at_once_without_retries(stack: dict[str, Any]) -> None:
    """An unknown metric is a ConfigError: the task fails on its first try (it has 2 retries for outages)."""
    api: Api = stack["api"]
    r = api.client.post(
        "/api/v2/dags/validate_accuracy/dagRuns",
        json={"conf": {"date": UI_DAY.isoformat(), "metrics": ["no_such_metric"]}, "logical_date": None},
        headers=api.headers,
    )
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert run_id.startswith(f"manual__{UI_DAY.isoformat()}__")
    deadline = time.monotonic() + 240
    while (state := api.get(f"/api/v2/dags/validate_accuracy/dagRuns/{run_id}")["state"]) not in ("failed", "success"):
        assert time.monotonic() < deadline, f"{run_id} still {state}"
        time.sleep(2)
    assert state == "failed"
    tis = {
        (t["task_id"], t["map_index"]): t
        for t in api.get(f"/api/v2/dags/validate_accuracy/dagRuns/{run_id}/taskInstances")["task_instances"]
    }
    failed = tis[("validate_with_gx", 0)]
    assert failed["state"] == "failed" and failed["try_number"] == 1 and failed["max_tries"] >= 2, failed
    assert [t["state"] for (task, _), t in tis.items() if task == "check_accuracy"] == ["upstream_failed"]
    with storage.transaction(stack["database_url"]) as cur:
        cur.execute("SELECT task_id, day, error FROM quality.task_failures WHERE run_id = %s", (run_id,))
        rows = cur.fetchall()
    assert [(t, d) for t, d, _ in rows] == [("validate_with_gx", UI_DAY.isoformat())]
    assert "unknown metric 'no_such_metric'" in rows[0][2] and "jobs" in rows[0][2]  # says what to fix


def test_replay_benchmark_triggered_from_the_ui_compares_two_versions(stack: dict[str, Any], browser: Any) -> None:
    """The Kappa comparison as a person triggers it: the DAG's form in a browser (Source, Candidate), then the
    stored day replayed into `stable` and `small-sketches` by the stack's own scheduler and workers. A label
    that is not one is refused by Airflow before any run (a 400 from the API the form calls)."""
    api: Api = stack["api"]
    bad = api.client.post(
        "/api/v2/dags/replay_benchmark/dagRuns",
        json={"conf": {"source": UI_DAY.isoformat(), "candidate": "Small Sketches"}, "logical_date": None},
        headers=api.headers,
    )
    assert bad.status_code == 400 and "does not match" in bad.text, bad.text
    with _page(browser, stack, "admin") as page:
        page.goto(stack["base"] + "/dags/replay_benchmark")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.locator("input[name=element_source]").fill(UI_DAY.isoformat())
        dialog.locator("input[name=element_candidate]").fill("small-sketches")
        page.screenshot(path=str(ARTIFACTS / "06-replay-benchmark-form.png"))
        dialog.get_by_role("button", name="Trigger").click()
        runs = api.wait_for_runs("replay_benchmark", lambda r: r["run_type"] == "manual", 1, timeout_s=300)
    run_id = runs[0]["dag_run_id"]
    assert runs[0]["conf"]["candidate"] == "small-sketches" and runs[0]["conf"]["source"] == UI_DAY.isoformat()
    deadline = time.monotonic() + 300
    while (state := api.get(f"/api/v2/dags/replay_benchmark/dagRuns/{run_id}")["state"]) not in ("failed", "success"):
        assert time.monotonic() < deadline, f"{run_id} still {state}"
        time.sleep(2)
    tis = api.get(f"/api/v2/dags/replay_benchmark/dagRuns/{run_id}/taskInstances")["task_instances"]
    assert state == "success", [(t["task_id"], t["state"]) for t in tis]
    with storage.transaction(stack["database_url"]) as cur:
        cur.execute(
            "SELECT run_id, source, status, verdict, events FROM quality.version_runs"
            " WHERE candidate = 'small-sketches'"
        )
        ((kappa_run, source, status, verdict, events),) = cur.fetchall()
        cur.execute(
            "SELECT count(*), count(DISTINCT label) FROM stream.version_results WHERE run_id = %s", (kappa_run,)
        )
        results, labels = cur.fetchone()
    assert status == "done" and source.startswith(f"the archive of {UI_DAY}") and events == 4000
    assert verdict.startswith("candidate 'small-sketches' against 'stable': ") and "x the CPU per event" in verdict
    assert labels == 2 and results > 100


def test_backfill_over_three_days_validates_three_days_in_order(stack: dict[str, Any]) -> None:
    api: Api = stack["api"]
    t0 = time.monotonic()
    r = api.client.post(
        "/api/v2/backfills",
        json={
            "dag_id": "nightly_recompute",
            "from_date": f"{BACKFILL_DAYS[0].isoformat()}T00:00:00Z",
            "to_date": f"{BACKFILL_DAYS[-1].isoformat()}T00:00:00Z",
            "run_backwards": False,
            "max_active_runs": 1,
            "dag_run_conf": {},
            "reprocess_behavior": "failed",
        },
        headers=api.headers,
    )
    assert r.status_code == 200, r.text
    seen: set[tuple[str, str, int]] = set()
    runs = api.wait_for_runs(
        "nightly_recompute",
        lambda r: r["run_type"] == "backfill",
        3,
        timeout_s=600,
        every=lambda: seen.update(_listening(stack["proc"].pid)),  # Spark's driver listens while a task runs
    )
    backfill_s = time.monotonic() - t0
    print("\nlistening sockets while the backfill ran:", sorted(seen))
    assert [s for s in seen if not _loopback(s[1])] == []
    assert any(name == "java" for name, _, _ in seen)  # Spark's driver was caught listening, on loopback
    by_day = {r["logical_date"][:10]: r for r in runs}  # a backfill run's logical date is the day it checks
    assert sorted(by_day) == [d.isoformat() for d in BACKFILL_DAYS]
    ordered = [by_day[d.isoformat()] for d in BACKFILL_DAYS]
    for earlier, later in zip(ordered, ordered[1:], strict=False):
        assert earlier["end_date"] <= later["start_date"], (earlier["dag_run_id"], later["dag_run_id"])
    assert [r["note"] for r in ordered] == [f"recomputes {d.isoformat()}" for d in BACKFILL_DAYS]
    # Each day's truth triggered validation; every day is validated, in one run or several.
    deadline = time.monotonic() + 420
    while True:
        with storage.transaction(stack["database_url"]) as cur:
            cur.execute(
                "SELECT day, bool_and(success), count(*) FROM quality.accuracy_history "
                "WHERE day = ANY(%s) GROUP BY day",
                (BACKFILL_DAYS,),
            )
            validated = {row[0]: row[1:] for row in cur.fetchall()}
        if len(validated) == 3 or time.monotonic() > deadline:
            break
        time.sleep(3)
    n_metrics = len(load_definitions(REPO_ROOT / "batchmark" / "metrics.toml").metrics)
    assert validated == {d: (d != FAULTY_DAY, n_metrics) for d in BACKFILL_DAYS}
    runs = api.wait_for_runs(  # the faulty day's validation fails its check_accuracy: that run fails
        "validate_accuracy", lambda r: r["run_type"] == "asset_triggered", 2, timeout_s=300, may_fail=True
    )
    checked: dict[str, str] = {}
    for run in runs:
        tis = api.get(f"/api/v2/dags/validate_accuracy/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]
        checked |= {t["rendered_map_index"]: t["state"] for t in tis if t["task_id"] == "check_accuracy"}
    assert {d.isoformat(): "success" for d in BACKFILL_DAYS[:-1]}.items() <= checked.items()
    assert checked[FAULTY_DAY.isoformat()] == "failed"  # the planted faults are an accuracy failure
    print(
        f"\nbackfill of 3 days: nightly runs done and all 3 days validated {time.monotonic() - t0:.0f}s after "
        f"the request (nightly runs alone {backfill_s:.0f}s)"
    )


def test_the_accuracy_view_in_the_ui_draws_the_validated_days(stack: dict[str, Any], browser: Any) -> None:
    """Signed in as viewer: the UI's Accuracy entry (the plugin's external view) shows every metric of the
    newest validated day, and its charts hold the days validated so far, value for value."""
    api: Api = stack["api"]
    # (the backfill test before this one waited for every day's validation; a refused manual run may exist)
    api.wait_for_runs("validate_accuracy", lambda r: UI_DAY.isoformat() in (r["note"] or ""), 1, 300, may_fail=True)
    views = [v for p in api.get("/api/v2/plugins")["plugins"] for v in p["external_views"]]
    assert {"name": "Accuracy", "href": "/batchmark/accuracy", "url_route": "accuracy"}.items() <= next(
        v for v in views if v["name"] == "Accuracy"
    ).items()
    for path in ("/batchmark/accuracy", "/batchmark/static/vendor/vega6/vega.min.js"):
        assert httpx.get(stack["base"] + path, timeout=10).status_code == 401, path
    assert httpx.get(stack["base"] + "/batchmark/accuracy", headers=api.login("viewer"), timeout=10).status_code == 200
    with storage.transaction(stack["database_url"]) as cur:
        cur.execute(
            """SELECT DISTINCT ON (day) day, mean_error FROM quality.accuracy_history WHERE metric = 'cpu_seconds'
               ORDER BY day, created_at DESC"""
        )
        validated = {d.isoformat(): e for d, e in cur.fetchall()}
    with _page(browser, stack, "viewer") as page:
        page.goto(stack["base"] + "/plugin/accuracy")
        frame = page.frame_locator("iframe").first
        frame.locator("#overview tbody tr").first.wait_for(timeout=30_000)
        inner = next(f for f in page.frames if f.url.endswith("/batchmark/accuracy"))
        inner.evaluate("window.bmReady")
        rows = inner.evaluate("Array.from(document.querySelectorAll('#overview tbody tr')).map(r => r.dataset.metric)")
        newest = inner.evaluate("document.getElementById('day').value")
        jobs_row = inner.evaluate(
            "Array.from(document.querySelector('#overview tr[data-metric=jobs]').children).map(td => td.innerText)"
        )
        points = inner.evaluate(
            "Array.from(document.querySelectorAll('#chart-error-cpu_seconds [aria-roledescription=point]'))"
            ".map(e => e.getAttribute('aria-label')).filter(l => l.includes('mean error'))"
        )
        page.screenshot(path=str(ARTIFACTS / "accuracy-view.png"), full_page=True)
    assert sorted(rows) == sorted(m.name for m in load_definitions(REPO_ROOT / "batchmark" / "metrics.toml").metrics)
    drawn = {dict(x.split(": ", 1) for x in label.split("; "))["day"] for label in points}
    assert drawn == set(validated) and len(drawn) >= 4  # the UI's day and the three backfilled days
    # the newest day is the one with planted faults: failed, with its lost and late events named
    assert newest == FAULTY_DAY.isoformat()
    assert "FAIL" in jobs_row[1] and " lost" in jobs_row[7] and " late" in jobs_row[7], jobs_row


def test_the_live_view_follows_a_replay_as_it_happens(stack: dict[str, Any], browser: Any) -> None:
    """The stack's worker folds a day being replayed; the live page, left open, shows its open windows'
    values grow without a reload. Without a session the page and its JSON are refused."""
    import threading

    for path in ("/batchmark/live", "/batchmark/live.json"):
        assert httpx.get(stack["base"] + path, timeout=10).status_code == 401, path
    day = LIVE_DAY
    data = stack["home"] / "data" / f"{day}.jsonl"
    generate(GeneratorConfig(day=day, events=30_000, partitions=2, seed=6), data)
    defs = load_definitions(REPO_ROOT / "batchmark" / "metrics.toml")
    sender = threading.Thread(
        target=replay,
        args=(data, f"127.0.0.1:{stack['broker_port']}", "events", defs),
        kwargs={"progress": False, "rate": 2500, "end_watermark": False},
    )
    totals: list[int] = []
    with _page(browser, stack, "viewer") as page:
        page.goto(stack["base"] + "/batchmark/live")
        page.wait_for_function("window.bmLive && window.bmLive.polls >= 1", timeout=20_000)
        page.evaluate("window.stillTheSamePage = true")
        sender.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and len({t for t in totals if t > 0}) < 3:
            totals.append(
                page.evaluate(
                    "day => (window.bmLive.windows || []).filter(w => w.window_start.startsWith(day))"
                    ".filter(w => w.metric === 'jobs').reduce((a, w) => a + w.events, 0)",
                    day.isoformat(),
                )
            )
            time.sleep(1)
        same = page.evaluate("window.stillTheSamePage === true")
        page.screenshot(path=str(ARTIFACTS / "live-view.png"))
    sender.join(60)
    assert same  # the page refreshed its table itself
    assert len({t for t in totals if t > 0}) >= 3, totals  # the open windows' counts moved while we watched


def test_viewer_cannot_trigger(stack: dict[str, Any], browser: Any) -> None:
    """The viewer reads everything and changes nothing.

    Airflow 3.3's UI does not hide the Trigger button by role (apache/airflow#57966): the viewer can open the
    dialog, and the server refuses the run (403), which the dialog shows. No run is created.
    """
    api: Api = stack["api"]
    before = len(api.runs("nightly_recompute"))
    with _page(browser, stack, "viewer") as page:
        page.goto(stack["base"] + "/dags/nightly_recompute")
        page.get_by_text("Runs", exact=True).first.wait_for()
        page.get_by_text("Search Dags").first.wait_for()  # the header's buttons have rendered
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.locator("input[name=element_date]").fill(UI_DAY.isoformat())
        with page.expect_response(lambda r: r.request.method == "POST" and "/dagRuns" in r.url) as refused:
            dialog.get_by_role("button", name="Trigger").click()
        assert refused.value.status == 403
        dialog.get_by_text(re.compile(r"403|forbidden|permission", re.I)).first.wait_for(timeout=15_000)
        print("\nthe viewer's trigger dialog says:", dialog.inner_text()[-300:].replace("\n", " | "))
        page.screenshot(path=str(ARTIFACTS / "05-viewer-refused.png"))
    assert len(api.runs("nightly_recompute")) == before
    viewer = api.login("viewer")
    r = api.client.post(
        "/api/v2/dags/nightly_recompute/dagRuns", json={"conf": {}, "logical_date": None}, headers=viewer
    )
    assert r.status_code == 403, r.text
    assert api.client.get("/api/v2/dags/nightly_recompute/dagRuns", headers=viewer).status_code == 200


def test_demo_beside_the_running_stack_touches_none_of_its_state(stack: dict[str, Any], pg_url: str) -> None:
    """`batchmark demo` from the same home as a running stack: its own database, Airflow home and broker."""
    api: Api = stack["api"]
    home: Path = stack["home"]
    runs_before = {d: len(api.runs(d)) for d in ("nightly_recompute", "validate_accuracy")}
    env = _clean_env(home)  # the same home as the stack, no DATABASE_URL: the demo picks its own
    demo_url = default_database_url(home / "demo")
    if storage.server_url(pg_url) != storage.server_url(demo_url):
        env["DATABASE_URL"] = _db_url(pg_url, storage.db_name(pg_url) + "_demo")
        demo_url = env["DATABASE_URL"]
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [BATCHMARK, "demo", "--events", "3000", "--date", DEMO_DAY.isoformat()],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(f"\ndemo beside the stack: exit {proc.returncode} in {time.monotonic() - t0:.0f}s\n{proc.stdout[-1500:]}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"{DEMO_DAY} PASS" in proc.stdout
        assert storage.db_name(demo_url) != storage.db_name(stack["database_url"])
        assert len(storage.fetch_results(demo_url, "truth", DEMO_DAY)) > 0
        for schema in ("stream", "truth"):  # the stack's database never saw the demo's day
            assert storage.fetch_results(stack["database_url"], schema, DEMO_DAY) == {}
        assert {d: len(api.runs(d)) for d in runs_before} == runs_before  # nor the stack's Airflow
        assert not (home / "lake" / "events" / f"date={DEMO_DAY}").exists()
        assert (home / "demo" / "lake" / "events" / f"date={DEMO_DAY}").exists()
    finally:
        _drop_database(demo_url)


def test_sigterm_to_up_stops_every_process_it_started(stack: dict[str, Any]) -> None:
    proc: subprocess.Popen[bytes] = stack["proc"]
    tree = _tree(proc.pid)
    names = sorted({_label(p) for p in tree[1:]})
    assert len(tree) >= 7, names  # broker, worker, api-server, scheduler, dag-processor, triggerer, ...
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    stop_s = time.monotonic() - t0
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == [], [(p.pid, _label(p)) for p in alive]
    assert not (stack["home"] / "stack.json").exists()
    print(f"\nSIGTERM: {len(tree)} processes stopped in {stop_s:.1f}s")


# ------------------------------------------------------------------------------- without the module's stack


def test_up_in_the_background_then_down(tmp_path: Path, pg_url: str) -> None:
    env = _clean_env(tmp_path)
    env["DATABASE_URL"] = _db_url(pg_url, storage.db_name(pg_url) + "_detached")
    api_port, broker_port = free_port(), free_port()
    try:
        up = subprocess.run(
            [BATCHMARK, "up", "--detach", "--port", str(api_port), "--broker-port", str(broker_port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{api_port}" in up.stdout and "`batchmark down` stops it" in up.stdout
        state = json.loads((tmp_path / "stack.json").read_text())
        tree = _tree(state["pid"])
        assert len(tree) >= 7
        assert httpx.get(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", timeout=5).status_code == 200
        again = subprocess.run(
            [BATCHMARK, "up", "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 2 and "already running" in again.stderr and "batchmark down" in again.stderr
        down = subprocess.run([BATCHMARK, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [(p.pid, _label(p)) for p in alive]
        assert not (tmp_path / "stack.json").exists()
    finally:
        subprocess.run([BATCHMARK, "down"], env=env, capture_output=True, timeout=120)
        _drop_database(env["DATABASE_URL"])


def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        env = _clean_env(tmp_path)
        r = subprocess.run([BATCHMARK, "up", "--port", str(taken)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"port {taken} on 127.0.0.1 is taken" in r.stderr and "--port" in r.stderr
