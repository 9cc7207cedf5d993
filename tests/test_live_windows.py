"""The live rows of open windows (stream.open_windows): written by the stream's checkpoint, replaced as events
arrive, gone (to stream.results) when the window closes; and the live page that shows them."""

from __future__ import annotations

import dataclasses
from datetime import date

import orjson

from batchmark import config, storage
from batchmark.definitions import load_definitions
from batchmark.engine import PartitionState
from batchmark.events import validate
from batchmark.stream_processor import StreamProcessor
from batchmark.windows import day_bounds_ms

DAY = date(2026, 7, 14)


def _event(i: int, ms: int, tenant: str = "acme") -> bytes:
    return orjson.dumps(
        {"event_id": f"live-{i}", "event_time": ms, "tenant": tenant, "user": f"u{i % 3}", "job_id": f"j{i}",
         "cpu": 2.0, "mem_gb": 8.0, "duration_s": 10.0 + i}
    )  # fmt: skip


def _live(url: str, topic: str) -> dict[tuple[str, str], tuple[float, int]]:
    with storage.transaction(url) as cur:
        cur.execute(
            "SELECT metric, group_key, value, n_events FROM stream.open_windows WHERE topic = %s AND window_start "
            "= to_timestamp(%s / 1000.0)",
            (topic, day_bounds_ms(DAY)[0]),
        )
        return {(m, g): (v, n) for m, g, v, n in cur.fetchall()}


def test_provisional_values_are_what_closing_would_write_and_leave_windows_open() -> None:
    defs = load_definitions(config.REPO_ROOT / "batchmark" / "metrics.toml")
    state = PartitionState(defs)
    start = day_bounds_ms(DAY)[0]
    for i in range(50):
        state.add(validate(_event(i, start + i * 100), defs.dataset), offset=i)
    snapshot = {(r.metric, r.group_key, r.window_start_ms): (r.value, r.n_events) for r in state.provisional()}
    assert state.open_windows == len(snapshot) == len(defs.metrics)  # one tenant, one window per metric
    final, _ = state.close_ready(flush_all=True)
    assert snapshot == {(r.metric, r.group_key, r.window_start_ms): (r.value, r.n_events) for r in final}
    assert snapshot[("jobs", "acme", start)] == (50.0, 50)


def test_the_checkpoint_keeps_the_live_rows_current(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    settings = dataclasses.replace(config.load(), lake=tmp_path / "lake", events_topic="live-test")
    defs = load_definitions(settings.definitions_path)
    proc = StreamProcessor(settings, defs, checkpoint_interval_s=0)
    proc.assign(0)
    start = day_bounds_ms(DAY)[0]
    for i in range(10):
        assert proc.process(0, i, b"acme", _event(i, start + i * 1000)) is None
    proc.checkpoint()
    assert _live(settings.database_url, "live-test")[("jobs", "acme")] == (10.0, 10)

    for i in range(10, 25):
        proc.process(0, i, b"acme", _event(i, start + i * 1000))
    proc._last_live = 0.0  # as if BATCHMARK_LIVE_INTERVAL_S had passed
    proc.checkpoint()
    live = _live(settings.database_url, "live-test")
    assert live[("jobs", "acme")] == (25.0, 25) and live[("cpu_min", "acme")] == (2.0, 25)

    proc.process(0, 25, b"acme", _event(25, start + 95_000))  # the watermark passes 1 min + 30 s lateness
    proc.checkpoint()  # not a refresh by time: the closed window still leaves the live rows here
    assert ("jobs", "acme") not in _live(settings.database_url, "live-test")
    with storage.transaction(settings.database_url) as cur:  # and the minute it opened is there already
        cur.execute(
            "SELECT n_events FROM stream.open_windows WHERE topic = 'live-test' AND metric = 'jobs' "
            "AND window_start = to_timestamp(%s / 1000.0)",
            (start + 60_000,),
        )
        assert cur.fetchall() == [(1,)]
    final = storage.fetch_results(settings.database_url, "stream", DAY)
    assert [v for (m, g, _), v in final.items() if m == "jobs" and g == "acme"] == [(25.0, 25)]
    with storage.transaction(settings.database_url) as cur:
        cur.execute("DELETE FROM stream.results WHERE day = %s", (DAY,))


def test_the_live_page_shows_values_change_without_a_reload(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    """A real HTTP server on 127.0.0.1 serves the live page and its JSON (from stream.open_windows); Chromium
    keeps the page open while the stream folds more events, and the table changes by itself."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from playwright.sync_api import sync_playwright

    from batchmark import accuracy_view
    from batchmark.broker import free_port
    from batchmark.reports import VENDOR
    from tests.browser import CHROMIUM, block_outside

    settings = dataclasses.replace(config.load(), lake=tmp_path / "lake", events_topic="live-page")
    defs = load_definitions(settings.definitions_path)
    with storage.transaction(settings.database_url) as cur:
        cur.execute("DELETE FROM stream.open_windows")
    proc = StreamProcessor(settings, defs, checkpoint_interval_s=0)
    proc.assign(0)
    start = day_bounds_ms(DAY)[0] + 3_600_000
    for i in range(5):
        proc.process(0, i, b"acme", _event(100 + i, start + i * 1000))
    proc.checkpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/live":
                body, kind = accuracy_view.render_live().encode(), "text/html"
            elif self.path == "/live.json":
                body, kind = json.dumps(accuracy_view.live_rows(settings.database_url)).encode(), "application/json"
            else:
                body, kind = (VENDOR / self.path.removeprefix("/static/vendor/")).read_bytes(), "text/css"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    outside: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            block_outside(page, ("http://127.0.0.1:",), outside)
            page.goto(f"http://127.0.0.1:{server.server_port}/live")
            page.wait_for_function("window.bmLive && window.bmLive.polls >= 1")
            page.evaluate("window.stillTheSamePage = true")
            jobs = "tr[data-key^='jobs|acme|'] td:nth-child(6)"
            assert page.locator(jobs).inner_text() == "5"
            for i in range(5, 12):
                proc.process(0, i, b"acme", _event(100 + i, start + i * 1000))
            proc._last_live = 0.0
            proc.checkpoint()
            page.wait_for_function(f"document.querySelector({json.dumps(jobs)}).innerText === '12'", timeout=10_000)
            assert page.evaluate("window.stillTheSamePage") is True  # refreshed in place, not reloaded
            assert page.evaluate("window.bmLive.polls") >= 2
            browser.close()
    finally:
        server.shutdown()
    assert outside == []


def test_a_failing_live_write_never_costs_the_checkpoint_its_results(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    """The live table is a display: with it gone (a schema not upgraded yet), results and checkpoints still land."""
    settings = dataclasses.replace(config.load(), lake=tmp_path / "lake", events_topic="live-broken")
    proc = StreamProcessor(settings, load_definitions(settings.definitions_path), checkpoint_interval_s=0)
    proc.assign(0)
    start = day_bounds_ms(DAY)[0] + 7_200_000
    with storage.transaction(settings.database_url) as cur:
        cur.execute("ALTER TABLE stream.open_windows RENAME TO open_windows_away")
    try:
        for i in range(3):
            proc.process(0, i, b"acme", _event(200 + i, start + i * 1000))
        proc.process(0, 3, b"acme", _event(203, start + 95_000))  # closes the first minute
        proc.checkpoint()
    finally:
        with storage.transaction(settings.database_url) as cur:
            cur.execute("ALTER TABLE stream.open_windows_away RENAME TO open_windows")
    assert storage.read_checkpoint(settings.database_url, "live-broken", 0)[1] == 4
    final = storage.fetch_results(settings.database_url, "stream", DAY)
    assert [v for (m, g, w), v in final.items() if m == "jobs" and w.timestamp() * 1000 == start] == [(3.0, 3)]
    with storage.transaction(settings.database_url) as cur:
        cur.execute("DELETE FROM stream.results WHERE day = %s", (DAY,))


def test_live_rows_can_be_switched_off(pg_url: str, tmp_path) -> None:  # noqa: ANN001
    settings = dataclasses.replace(config.load(), lake=tmp_path / "lake", events_topic="live-off", live_interval_s=0.0)
    proc = StreamProcessor(settings, load_definitions(settings.definitions_path), checkpoint_interval_s=0)
    proc.assign(0)
    start = day_bounds_ms(DAY)[0]
    for i in range(5):
        proc.process(0, i, b"acme", _event(300 + i, start + i * 1000))
    proc.checkpoint()
    assert _live(settings.database_url, "live-off") == {}
    assert storage.read_checkpoint(settings.database_url, "live-off", 0)[1] == 5
