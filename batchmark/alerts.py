"""Accuracy alerts: the drift checks run over the stored history, one alert per change of state, sent through
Airflow notifiers from an outbox.

- :func:`evaluate_day` reads ``quality.accuracy_history`` (the newest validation of each day) and
  ``storage.rejected_per_day``, lets :mod:`batchmark.drift` replay each (metric, check) state up to the day, and
  records the day's transitions in ``quality.alerts`` -- idempotent: evaluating a day again adds nothing. An
  alert equal to one recorded in the previous ``suppress_days`` days is kept but not sent (flapping).
- Each alert gets one ``quality.alert_deliveries`` row per channel (an Airflow connection named in
  BATCHMARK_ALERT_CHANNELS). :func:`deliver_pending` sends what is pending and due, with the provider's notifier
  (apprise: webhooks, Slack, email and ~100 services by URL; smtp: email); a failed send stays pending with
  exponential backoff (base BATCHMARK_ALERT_RETRY_SECONDS, at most 6 hours) and is retried by the next run; a
  delivered one is never sent again.
"""

from __future__ import annotations

import dataclasses
import html
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from batchmark import drift, storage
from batchmark.config import Settings
from batchmark.definitions import Definitions, Metric
from batchmark.errors import ConfigError
from batchmark.validation import causes, describe

MAX_BACKOFF_S = 6 * 3600
LEASE_S = 300  # a claimed delivery that was neither delivered nor failed after this is tried again
TITLE_PREFIX = "[batchmark]"


@dataclasses.dataclass(frozen=True)
class Alert:
    """One recorded alert: a (metric, check) state change on a day, with the message people get."""

    id: int
    day: date
    metric: str
    check: str
    severity: str
    title: str
    message: str
    report_url: str
    suppressed: bool


@dataclasses.dataclass
class Deliveries:
    """What one pass over the outbox did."""

    delivered: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (alert id, channel)
    failed: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (alert id, channel, error)

    def line(self) -> str:
        """e.g. '2 delivered, 1 failed (stays pending: batchmark_webhook: connection refused)'."""
        text = f"{len(self.delivered)} delivered, {len(self.failed)} failed"
        if self.failed:
            text += " (stays pending: " + "; ".join(f"{c}: {e}" for _, c, e in self.failed) + ")"
        return text


_HISTORY_SQL = """
SELECT DISTINCT ON (metric, day) metric, day, windows, missing, incomplete, impossible,
       coalesce(within_tolerance, success) AS within_tolerance, over_tolerance, mean_error, max_error, tolerance,
       truth_events, late_events AS late, lost_events AS lost, duplicate_events AS duplicate, kind,
       sketch_effect, report_page
FROM quality.accuracy_history WHERE day <= %s
ORDER BY metric, day, created_at DESC, id DESC
"""


def history(url: str, until: date, topic: str = "events") -> tuple[dict[str, list[dict[str, Any]]], dict[date, int]]:
    """({metric: the newest validation of each day up to `until`, as dicts in day order}, {day: records
    rejected that day} of the dataset whose events topic is `topic`)."""
    with storage.transaction(url) as cur:
        cur.execute(_HISTORY_SQL, (until,))
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        rejected = storage.rejected_per_day(cur, topic, until)
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        r["rejected"] = rejected.get(r["day"], 0)
        by_metric[r["metric"]].append(r)
    return dict(by_metric), rejected


def _dataset_days(by_metric: dict[str, list[dict[str, Any]]], rejected: dict[date, int]) -> list[drift.Day]:
    """One row per validated day for the dataset-wide checks: its events (the largest metric's) and rejections."""
    events: dict[date, int] = defaultdict(int)
    for rows in by_metric.values():
        for r in rows:
            events[r["day"]] = max(events[r["day"]], int(r["truth_events"]))
    return [drift.Day(day=d, windows=0, truth_events=n, rejected=rejected.get(d, 0)) for d, n in sorted(events.items())]


def evaluate_day(settings: Settings, defs: Definitions, day: date) -> list[Alert]:
    """Record the alerts of one validated day and queue them for every channel; returns the alerts recorded.

    Each check's level on the day (batchmark.drift on the history up to it) is compared with the state the
    recorded alerts left it in: a difference is an alert. So evaluating a day again records nothing, and a day
    validated again with other figures (the stream caught up) records the change. Only the newest validated
    day of a metric is judged: an older day validated again is history, not the present. One evaluation at a
    time (a transaction-level advisory lock).
    """
    url = settings.database_url
    storage.ensure_database(url)
    by_metric, rejected = history(url, day, settings.events_topic)
    s = defs.alerts
    with storage.transaction(url) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(4243)")
        cur.execute("SELECT metric, max(day) FROM quality.accuracy_history GROUP BY metric")
        newest = dict(cur.fetchall())
        cur.execute(  # the state each (metric, check) was left in, and its newest alert that was sent
            """SELECT DISTINCT ON (metric, check_name) metric, check_name, state_after
               FROM quality.alerts ORDER BY metric, check_name, day DESC, id DESC"""
        )
        state = {(m, c): st for m, c, st in cur.fetchall()}
        found: list[tuple[drift.Transition, dict[str, Any] | None, Metric | None]] = []
        for m in defs.metrics:
            rows = by_metric.get(m.name, [])
            if not rows or rows[-1]["day"] != day or newest.get(m.name, day) > day:
                continue  # not validated that day, or a later day is the present
            for v in drift.evaluate(drift.as_days(rows), s):
                before = state.get((m.name, v.check), drift.OK)
                if v.level is not None and v.level != before:
                    found.append((drift.Transition(m.name, day, v, before, v.level), rows[-1], m))
        ds_days = _dataset_days(by_metric, rejected)
        if ds_days and ds_days[-1].day == day and max(newest.values(), default=day) <= day:
            for v in drift.evaluate_dataset(ds_days, s):
                before = state.get((drift.DATASET, v.check), drift.OK)
                if v.level is not None and v.level != before:
                    found.append((drift.Transition(drift.DATASET, day, v, before, v.level), None, None))
        return [_record(cur, settings, t, row, m, rejected.get(day, 0), s.suppress_days) for t, row, m in found]


def _record(  # noqa: PLR0913
    cur: Any,
    settings: Settings,
    t: drift.Transition,
    row: dict[str, Any] | None,
    metric: Metric | None,
    rejected: int,
    suppress_days: int,
) -> Alert:
    """Insert one transition as an alert, with a pending delivery per channel.

    Flapping: a state equal to the newest alert already sent for the (metric, check) is recorded but not sent
    (people's last message already says it), and a recovery less than suppress_days after that alert waits
    out the rest of the interval before it is sent -- if the state changes again meanwhile, it is superseded
    and never sent. So a flapping check sends at most one message per interval, and the last message people
    got always says the current state.
    """
    title, message, link = compose(settings, t, row, metric, rejected)
    v = t.verdict
    cur.execute(  # the newest alert announced (not suppressed, not a recovery still on hold)
        """SELECT a.day, a.state_after FROM quality.alerts a
           WHERE a.metric = %s AND a.check_name = %s AND NOT a.suppressed
             AND (a.hold_until IS NULL OR a.hold_until < %s)
           ORDER BY a.day DESC, a.id DESC LIMIT 1""",
        (t.metric, v.check, t.day),
    )
    announced = cur.fetchone()
    suppressed = announced is not None and announced[1] == t.after
    hold_days, hold_until = 0, None
    if t.after == drift.OK and announced is not None and (t.day - announced[0]).days < suppress_days:
        hold_until = announced[0] + timedelta(days=suppress_days)
        hold_days = (hold_until - t.day).days
    cur.execute(
        """INSERT INTO quality.alerts (day, metric, check_name, severity, state_before, state_after, observed,
               baseline, threshold, title, message, report_url, suppressed, hold_until)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (t.day, t.metric, v.check, t.severity, t.before, t.after, _num(v.observed), _num(v.baseline),
         _num(v.threshold), title, message, link, suppressed, hold_until),
    )  # fmt: skip
    alert_id = cur.fetchone()[0]
    if not suppressed:
        for channel in settings.alert_channels:
            cur.execute(
                """INSERT INTO quality.alert_deliveries (alert_id, channel, next_attempt_at)
                   VALUES (%s, %s, now() + %s * interval '1 day')""",
                (alert_id, channel, hold_days),
            )
    return Alert(alert_id, t.day, t.metric, v.check, t.severity, title, message, link, suppressed)


def _num(x: float | None) -> float | None:
    return None if x is None else float(x)


def compose(
    settings: Settings, t: drift.Transition, row: dict[str, Any] | None, metric: Metric | None, rejected: int
) -> tuple[str, str, str]:
    """(title, plain-text message, report link) of an alert: what a person needs to act on it."""
    v = t.verdict
    page = (row or {}).get("report_page")
    link = f"{settings.report_url}/{page}" if page else f"{settings.report_url}/index.html"
    what = f"{t.metric} {v.check}"
    title = f"{TITLE_PREFIX} {t.severity.upper()}: {what} on {t.day.isoformat()}"
    lines = [
        f"{t.metric}" + (f" ({metric.kind})" if metric else "") + f" on {t.day.isoformat()}: check {v.check} went "
        f"{t.before} -> {t.after}.",
        f"Observed: {v.detail}.",
    ]
    if row is not None:
        lines.append(
            "Figures: "
            + describe(
                t.metric,
                int(row["windows"]),
                int(row["missing"]),
                int(row["over_tolerance"]),
                int(row["incomplete"]) + int(row["impossible"]),
                row["max_error"],
                row["tolerance"],
            )
            + "."
        )
        lines.append(f"Causes: {causes_text(row, rejected)}.")
    else:
        lines.append(f"Causes: {rejected} records rejected that day.")
    lines.append(f"Action: {suggest(settings, t, row, metric)}")
    lines.append(f"Report: {link}")
    return title, "\n".join(lines), link


def causes_text(row: dict[str, Any], rejected: int, short: bool = False) -> str:
    """The cause split of a metric's day: late / lost / duplicated events, the sketch's part, rejections."""
    split = causes(int(row["late"]), int(row["lost"]), int(row["duplicate"])) or "no late, lost or duplicated events"
    sketch = row.get("sketch_effect") or 0
    if short:
        return f"{split}; sketch {sketch:.3g}; {rejected} rejected"
    return (
        f"{split}; the sketch's own part {sketch:.3g} (sum over windows of |stream - exact value of what it "
        f"saw|); {rejected} records rejected that day"
    )


def suggest(settings: Settings, t: drift.Transition, row: dict[str, Any] | None, metric: Metric | None) -> str:
    """The action the alert suggests, from the check and the largest cause."""
    check = t.verdict.check
    if (
        t.after == drift.OK
        and check in ("error_trend", "error_drift")
        or t.after == drift.OK
        and check.endswith("_rise")
    ):
        return (
            "look at the level before you relax: this check compares the metric with its own recent past, so a "
            "change that lasts becomes the new baseline and the check goes quiet (the figures above say where "
            "the error is now; the tolerance check still guards the absolute level)."
        )
    if t.after == drift.OK:
        return "none: the check is back within its limits."
    if check == "rejected_rise":
        return (
            f"read the dead-letter topic {settings.dlq_topic}: each record says why it was rejected; fix the "
            "producer, or the definitions if the rules are wrong."
        )
    counts = {k: int((row or {}).get(k) or 0) for k in ("late", "lost", "duplicate")}
    cause = {"late_rise": "late", "lost_rise": "lost", "duplicate_rise": "duplicate"}.get(check)
    if cause is None and any(counts.values()):
        cause = max(counts, key=lambda k: counts[k])
    if cause == "late":
        lateness = f" (now {metric.allowed_lateness_ms / 1000:g}s)" if metric else ""
        return f"raise allowed_lateness of {t.metric}{lateness} in the definitions, or find what delays producers."
    if cause == "lost":
        return (
            "fix ingestion: events in the system of record never reached the stream (producer errors, broker "
            "retention, a worker that skipped records)."
        )
    if cause == "duplicate":
        return "make producers idempotent (or find the one that retries): duplicates are counted twice."
    if metric is not None and metric.aggregate.advice:
        return metric.aggregate.advice.format(metric=t.metric)
    return "open the report: the windows over tolerance are listed there."


# -- delivery ------------------------------------------------------------------------------------------------


class DeliveryError(RuntimeError):
    """A channel did not take the message."""


def notifier(conn_id: str, title: str, body: str, severity: str) -> Any:
    """The Airflow notifier for a channel: the connection's type picks the provider (apprise or smtp)."""
    from airflow.providers.common.compat.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    if conn.conn_type == "apprise":
        return _apprise_notifier()(apprise_conn_id=conn_id, title=title, body=body, notify_type=_apprise_type(severity))
    if conn.conn_type in ("smtp", "email"):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        to = conn.extra_dejson.get("to")
        if not to:
            raise ConfigError(f'smtp connection {conn_id} has no recipients: add "to" to its extra')
        return SmtpNotifier(
            smtp_conn_id=conn_id,
            to=to,
            from_email=conn.extra_dejson.get("from_email") or "batchmark@localhost",
            subject=title,
            html_content=f"<pre>{html.escape(body)}</pre>",
        )
    raise ConfigError(
        f"alert channel {conn_id} is a {conn.conn_type!r} connection: batchmark sends alerts through apprise or "
        "smtp connections (see the README, 'Alerts')"
    )


def _apprise_type(severity: str) -> Any:
    from apprise import NotifyType

    return {"error": NotifyType.FAILURE, "warning": NotifyType.WARNING}.get(severity, NotifyType.SUCCESS)


def _apprise_notifier() -> type:
    """AppriseNotifier that raises when apprise reports a failed send (the provider's hook ignores it)."""
    import apprise
    from airflow.providers.apprise.notifications.apprise import AppriseNotifier

    class CheckedAppriseNotifier(AppriseNotifier):
        def notify(self, context: Any) -> None:
            targets = apprise.Apprise()
            self.hook.set_config_from_conn(conn=self.hook.get_connection(self.apprise_conn_id), apprise_obj=targets)
            with apprise.LogCapture(level=apprise.logging.WARNING) as log:
                sent = targets.notify(
                    body=self.body, title=self.title or "", notify_type=self.notify_type, body_format=self.body_format
                )
            if not sent:
                reason = " ".join(log.getvalue().split())[-300:] or "apprise could not send"
                raise DeliveryError(reason)

    return CheckedAppriseNotifier


def deliver_pending(settings: Settings, retry_base_s: float | None = None) -> Deliveries:
    """Send every pending delivery that is due; failures stay pending with exponential backoff.

    Each delivery is claimed (status 'sending', a lease of LEASE_S) and marked in its own transaction, so a
    failure elsewhere never re-sends what was delivered; a worker that dies mid-send leaves the lease to
    expire and the delivery is tried again (at least once). A delivery whose state is no longer the
    (metric, check)'s state when it could go out (it changed again meanwhile) is 'superseded' and not sent.
    """
    base = settings.alert_retry_seconds if retry_base_s is None else retry_base_s
    done = Deliveries()
    url = settings.database_url
    storage.ensure_database(url)
    while True:
        with storage.transaction(url) as cur:
            cur.execute(
                """SELECT d.alert_id, d.channel, d.attempts, a.title, a.message, a.severity,
                          a.state_after IS DISTINCT FROM (  -- the (metric, check)'s state now: its newest alert
                              SELECT n.state_after FROM quality.alerts n WHERE n.metric = a.metric
                              AND n.check_name = a.check_name ORDER BY n.day DESC, n.id DESC LIMIT 1)
                   FROM quality.alert_deliveries d JOIN quality.alerts a ON a.id = d.alert_id
                   WHERE (d.status = 'pending' AND d.next_attempt_at <= now())
                      OR (d.status = 'sending' AND d.next_attempt_at <= now())
                   ORDER BY a.id, d.channel LIMIT 1 FOR UPDATE OF d SKIP LOCKED"""
            )
            claimed = cur.fetchone()
            if claimed is None:
                return done
            alert_id, channel, attempts, title, message, severity, superseded = claimed
            status = "superseded" if superseded else "sending"
            cur.execute(
                """UPDATE quality.alert_deliveries SET status = %s, next_attempt_at = now() + %s * interval '1 second'
                   WHERE alert_id = %s AND channel = %s""",
                (status, LEASE_S, alert_id, channel),
            )
        if superseded:
            continue
        try:
            notifier(channel, title, message, severity).notify({})
        except Exception as exc:  # noqa: BLE001 -- any channel failure: stays pending, retried later
            error = f"{type(exc).__name__}: {exc}"[:500]
            wait = min(base * 2**attempts, MAX_BACKOFF_S)
            with storage.transaction(url) as cur:
                cur.execute(
                    """UPDATE quality.alert_deliveries SET status = 'pending', attempts = attempts + 1,
                           last_error = %s, next_attempt_at = now() + %s * interval '1 second'
                       WHERE alert_id = %s AND channel = %s""",
                    (error, wait, alert_id, channel),
                )
            done.failed.append((alert_id, channel, error))
        else:
            with storage.transaction(url) as cur:
                cur.execute(
                    """UPDATE quality.alert_deliveries SET status = 'delivered', attempts = attempts + 1,
                           delivered_at = now(), last_error = NULL WHERE alert_id = %s AND channel = %s""",
                    (alert_id, channel),
                )
            done.delivered.append((alert_id, channel))


def recent(url: str, days: int = 30, today: date | None = None) -> list[dict[str, Any]]:
    """The alerts of the last `days` days with their delivery status (quality.alert_status), newest first."""
    since = (today or datetime.now(tz=UTC).date()) - timedelta(days=days)
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT id, day, metric, check_name, severity, delivery_status, delivered_to, last_error, report_url
               FROM quality.alert_status WHERE day >= %s ORDER BY day DESC, id DESC""",
            (since,),
        )
        names = [c.name for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
