"""Alerts end to end below the DAG: a stored history -> quality.alerts -> Airflow notifiers -> real receivers.

The receivers are real servers on 127.0.0.1 inside the test: an HTTP server that takes apprise's JSON
webhook, and an SMTP server (aiosmtpd) that takes the smtp provider's email. Channels are Airflow connections
given as AIRFLOW_CONN_* variables, as a user would in a deployment's environment.
"""

from __future__ import annotations

import json
from datetime import date, timedelta

import pytest

from batchmark import alerts, config, storage
from batchmark.broker import free_port
from batchmark.definitions import load_definitions
from tests.receivers import Mailbox, Webhook, channel_env

START = date(2026, 9, 1)
METRIC = "distinct_users"  # a sketch metric: relative error, tolerance 3 x 1.04 / sqrt(4096)


@pytest.fixture
def receivers(pg_url: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    hook, mailbox = Webhook(free_port()).start(), Mailbox().start()
    for k, v in channel_env(hook, mailbox).items():
        monkeypatch.setenv(k, v)
    with storage.transaction(pg_url) as cur:
        cur.execute("TRUNCATE quality.alerts, quality.alert_deliveries, quality.accuracy_history, quality.rejections")
    yield hook, mailbox
    hook.stop()
    mailbox.stop()


PLANNED: dict[int, tuple] = {}  # day index -> its accuracy_history row, inserted when the day is "validated"


def _history(url: str, errors: list[float], late: list[int] | None = None, incomplete: list[int] | None = None) -> None:
    """Plan one validated day per error, from START; _validated(i) records day i (as a nightly validation would,
    one day after the other)."""
    PLANNED.clear()
    for i, e in enumerate(errors):
        PLANNED[i] = (
            f"run-{i}", START + timedelta(days=i), METRIC, e <= 0.0487 and not (incomplete or [0] * 99)[i],
            int(e > 0.0487), e * 2, e, (late or [500] * 99)[i], (incomplete or [0] * 99)[i], e <= 0.0487,
            e * 24, f"validations/accuracy_{METRIC}/run-{i}/x.html",
        )  # fmt: skip


def _validated(i: int) -> None:
    row = PLANNED.pop(i, None)
    if row is None:
        return
    with storage.transaction(config.load().database_url) as cur:
        cur.execute(
            """INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing,
                   over_tolerance, max_error, mean_error, tolerance, kind, late_events, duplicate_events,
                   lost_events, incomplete, impossible, within_tolerance, truth_events, sketch_effect,
                   report_page)
               VALUES (%s, %s, %s, %s, 24, 0, %s, %s, %s, 0.0487, 'distinct', %s, 0, 0, %s, 0, %s, 100000,
                       %s, %s)""",
            row,
        )


def _evaluate(days: range, deliver: bool = False) -> list[alerts.Alert]:
    """Validate (record) and evaluate each day in turn; with deliver, send after each day as the DAG does."""
    settings = config.load()
    defs = load_definitions(settings.definitions_path)
    out = []
    for i in days:
        _validated(i)
        out += alerts.evaluate_day(settings, defs, START + timedelta(days=i))
        if deliver:
            alerts.deliver_pending(settings)
    return out


def test_a_step_reaches_webhook_and_email_once_with_what_to_do(pg_url: str, receivers) -> None:
    hook, mailbox = receivers
    errors = [0.010, 0.011, 0.009, 0.010, 0.012, 0.010, 0.011, 0.010, 0.009, 0.010] + [0.03]
    late = [500] * 10 + [4000]  # the step comes with 8x the late events
    _history(pg_url, errors, late=late)

    recorded = _evaluate(range(11))
    assert _evaluate(range(11)) == []  # evaluating again records nothing: one alert per change
    sent = alerts.deliver_pending(config.load())

    assert [(a.day, a.metric, a.check, a.severity) for a in recorded] == [
        (START + timedelta(days=10), METRIC, "error_trend", "warning"),
        (START + timedelta(days=10), METRIC, "late_rise", "warning"),
    ]
    assert len(sent.delivered) == 4 and sent.failed == []
    titles = sorted(b["title"] for b in hook.bodies)
    assert titles == [
        f"[batchmark] WARNING: {METRIC} error_trend on 2026-09-11",
        f"[batchmark] WARNING: {METRIC} late_rise on 2026-09-11",
    ]
    trend = next(b["message"] for b in hook.bodies if "error_trend" in b["title"])
    assert "distinct_users (distinct) on 2026-09-11: check error_trend went ok -> warning." in trend
    assert "mean error 0.03 against a 10-day median of 0.01" in trend
    assert "Causes: 4000 late events;" in trend
    assert "Action: raise allowed_lateness of distinct_users (now 30s)" in trend
    assert f"Report: http://127.0.0.1:8080/batchmark/reports/validations/accuracy_{METRIC}/run-10/x.html" in trend
    assert sorted(m["Subject"] for _, m in mailbox.messages) == titles
    assert all(rcpt == ["oncall@example.com"] for rcpt, _ in mailbox.messages)
    body = mailbox.bodies()[f"[batchmark] WARNING: {METRIC} late_rise on 2026-09-11"]
    assert "check late_rise went ok -> warning." in body
    assert "share of late events 0.04 against a 10-day median of 0.005" in body

    assert alerts.deliver_pending(config.load()).delivered == []  # nothing is sent twice
    status = {(r["check_name"], r["delivery_status"], tuple(r["delivered_to"])) for r in alerts.recent(pg_url, 400)}
    assert status == {
        ("error_trend", "delivered", ("bm_email", "bm_webhook")),
        ("late_rise", "delivered", ("bm_email", "bm_webhook")),
    }


def test_a_channel_that_is_down_keeps_the_alert_pending_until_it_is_back(pg_url: str, receivers) -> None:
    hook, mailbox = receivers
    _history(pg_url, [0.01] * 8, incomplete=[0] * 7 + [3])
    hook.stop()

    recorded = _evaluate(range(8))
    first = alerts.deliver_pending(config.load(), retry_base_s=3600)

    assert [(a.check, a.severity) for a in recorded] == [("completeness", "error")]
    assert first.delivered == [(recorded[0].id, "bm_email")]  # the email went; the webhook did not
    assert [(i, c) for i, c, _ in first.failed] == [(recorded[0].id, "bm_webhook")]
    assert alerts.deliver_pending(config.load()).failed == []  # backing off: not due yet, not tried
    (row,) = alerts.recent(pg_url, 400)
    assert row["delivery_status"] == "pending" and row["delivered_to"] == ["bm_email"] and row["last_error"]

    hook.start()  # back on the same address
    with storage.transaction(pg_url) as cur:  # an hour later
        cur.execute("UPDATE quality.alert_deliveries SET next_attempt_at = now() - interval '1 second'")
    again = alerts.deliver_pending(config.load())

    assert again.delivered == [(recorded[0].id, "bm_webhook")] and again.failed == []
    assert [b["title"] for b in hook.bodies] == [f"[batchmark] ERROR: {METRIC} completeness on 2026-09-08"]
    assert "3 of 24 truth windows incomplete (3 with truth events the stream did not fold)" in hook.bodies[0]["message"]
    assert "Action: raise allowed_lateness of distinct_users (now 30s)" in hook.bodies[0]["message"]  # 500 late
    assert len(mailbox.messages) == 1  # the email was not sent twice
    assert alerts.deliver_pending(config.load()).delivered == []
    (row,) = alerts.recent(pg_url, 400)
    assert row["delivery_status"] == "delivered"


def _pass_time(url: str) -> None:
    """As if the held deliveries' time had come (a day later)."""
    with storage.transaction(url) as cur:
        cur.execute("UPDATE quality.alert_deliveries SET next_attempt_at = now() - interval '1 second'")


def test_flapping_sends_one_message_and_the_last_one_says_the_current_state(pg_url: str, receivers) -> None:
    hook, _ = receivers
    # over tolerance on day 7, fine on 8, over again on 9: within suppress_days = 2 of day 7's alert
    _history(pg_url, [0.01] * 7 + [0.06, 0.01, 0.06])

    recorded = _evaluate(range(10), deliver=True)
    _pass_time(pg_url)
    alerts.deliver_pending(config.load())

    got = [((a.day - START).days, a.severity, a.suppressed) for a in recorded if a.check == "tolerance"]
    assert got == [(7, "error", False), (8, "recovered", False), (9, "error", True)]
    titles = [b["title"] for b in hook.bodies if "tolerance on" in b["title"]]
    assert titles == [f"[batchmark] ERROR: {METRIC} tolerance on 2026-09-08"]  # still the state now: error
    statuses = {r["day"]: r["delivery_status"] for r in alerts.recent(pg_url, 400) if r["check_name"] == "tolerance"}
    assert statuses == {
        START + timedelta(days=7): "delivered",
        START + timedelta(days=8): "superseded",  # held, then the error came back: never sent
        START + timedelta(days=9): "suppressed",  # people's last message already says error
    }


def test_a_recovery_that_lasts_is_sent_after_the_hold(pg_url: str, receivers) -> None:
    hook, _ = receivers
    _history(pg_url, [0.01] * 7 + [0.06, 0.01, 0.01, 0.01])
    recorded = _evaluate(range(11), deliver=True)
    titles = [b["title"] for b in hook.bodies if "tolerance on" in b["title"]]
    assert titles == [f"[batchmark] ERROR: {METRIC} tolerance on 2026-09-08"]  # the recovery is on hold
    _pass_time(pg_url)
    alerts.deliver_pending(config.load())
    titles = [b["title"] for b in hook.bodies if "tolerance on" in b["title"]]
    assert titles[1:] == [f"[batchmark] RECOVERED: {METRIC} tolerance on 2026-09-09"]
    assert [(a.severity, a.suppressed) for a in recorded if a.check == "tolerance"] == [
        ("error", False),
        ("recovered", False),
    ]


def test_a_day_validated_again_after_the_stream_caught_up_recovers(pg_url: str, receivers) -> None:
    """Day 7 is validated while the stream is behind (incomplete), then again once it caught up: the second
    validation's figures are the day's, and the completeness alert recovers."""
    _history(pg_url, [0.01] * 8, incomplete=[0] * 7 + [5])
    first = _evaluate(range(8))
    with storage.transaction(pg_url) as cur:  # the newest validation of day 7 is complete
        cur.execute(
            """INSERT INTO quality.accuracy_history (run_id, day, metric, success, windows, missing, over_tolerance,
                   max_error, mean_error, tolerance, kind, incomplete, within_tolerance, truth_events)
               VALUES ('run-7b', %s, %s, true, 24, 0, 0, 0.02, 0.01, 0.0487, 'distinct', 0, true, 100000)""",
            (START + timedelta(days=7), METRIC),
        )
    again = _evaluate(range(7, 8))
    assert [(a.check, a.severity) for a in first] == [("completeness", "error")]
    assert [(a.check, a.severity) for a in again] == [("completeness", "recovered")]
    assert _evaluate(range(7, 8)) == []  # and evaluating it once more changes nothing
    assert _evaluate(range(3, 4)) == []  # an older day validated again is history: no alert


def test_without_a_channel_alerts_are_recorded_and_shown(pg_url: str, receivers, monkeypatch) -> None:
    monkeypatch.setenv("BATCHMARK_ALERT_CHANNELS", "")
    _history(pg_url, [0.01] * 3 + [0.06])
    recorded = _evaluate(range(4))
    assert [a.check for a in recorded] == ["tolerance"]
    assert alerts.deliver_pending(config.load()).delivered == []
    assert [r["delivery_status"] for r in alerts.recent(pg_url, 400)] == ["no channel"]


def test_a_channel_of_another_type_is_refused_with_what_to_fix(monkeypatch) -> None:
    from batchmark.errors import ConfigError

    monkeypatch.setenv("AIRFLOW_CONN_BM_HTTP", json.dumps({"conn_type": "http", "host": "127.0.0.1"}))
    with pytest.raises(ConfigError, match="through apprise or smtp connections"):
        alerts.notifier("bm_http", "t", "b", "error")


def test_the_cli_records_a_day_and_lists_alerts_with_their_delivery(pg_url: str, receivers, capsys) -> None:
    from batchmark.cli import main

    hook, _ = receivers
    _history(pg_url, [0.01] * 3 + [0.06])
    for i in range(3):
        _validated(i)
        assert main(["alerts", "--date", (START + timedelta(days=i)).isoformat()]) == 0
    capsys.readouterr()

    _validated(3)
    assert main(["alerts", "--date", "2026-09-04"]) == 0
    out = capsys.readouterr().out
    assert f"1 new alerts for 2026-09-04\n  [batchmark] ERROR: {METRIC} tolerance on 2026-09-04" in out
    assert "deliveries: 2 delivered, 0 failed" in out
    assert [b["title"] for b in hook.bodies] == [f"[batchmark] ERROR: {METRIC} tolerance on 2026-09-04"]

    assert main(["alerts", "--days", "400"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [f"2026-09-04  error     {METRIC} tolerance       delivered  to bm_email, bm_webhook"]
    assert main(["alerts", "--date", "2026-09-31"]) == 2
    assert "2026-09-31" in capsys.readouterr().err
