"""The Accuracy view: how accurate the stream was, per metric and day, read from the real tables.

One page, two ways to get it: the Airflow plugin serves it at ``/batchmark/accuracy`` (in the UI's navigation,
scripts served by the plugin), and ``batchmark report`` writes it as one self-contained HTML file (scripts
inline) for people outside Airflow. Either way nothing is fetched from the internet. Panels:
- overview: per metric, the day's status, error against tolerance, windows missing / over / incomplete, the
  cause split, the open alerts, the decision (stream alone enough, or keep the nightly batch) and the metric's
  Data Docs page;
- per metric: the error over the days with the tolerance band and the alerts marked; the cause split over days;
- bin packing: the competitive ratio FF/FFD over days against 1.7, and FF against the lower bound;
- the worst windows of the day; the recent alerts.
Charts are Vega-Lite specs made with Altair; their JavaScript (Vega 6, Vega-Lite 6, vega-embed 7) is vendored.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from batchmark import alerts, drift, storage
from batchmark.definitions import Definitions

VENDOR = Path(__file__).parent / "static" / "vendor"
SCRIPTS = ("vega6/vega.min.js", "vega6/vega-lite.min.js", "vega6/vega-embed.min.js")
STYLE = "bootstrap/css/bootstrap.min.css"
BINPACK_BOUND = 1.7  # online First Fit uses at most 1.7 OPT bins


@dataclasses.dataclass
class ViewData:
    """Everything the page shows, from the tables: one day in focus and the days before it."""

    day: date | None
    days: int
    decision_days: int
    history: dict[str, list[dict[str, Any]]]  # metric -> newest validation per day, in day order
    rejected: dict[date, int]
    alerts: list[dict[str, Any]]
    worst: list[dict[str, Any]]
    binpack: list[dict[str, Any]]  # per binpack metric and day: FF/FFD and FF/lower bound
    kinds: dict[str, str]
    report_url: str
    aggregates: dict[str, Any] = dataclasses.field(default_factory=dict)  # metric -> its Aggregate (bound, name)
    versions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # newest Kappa comparison runs
    version_metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the newest done run's rows


def load(url: str, defs: Definitions, report_url: str, day: date | None = None, days: int = 30,
         decision_days: int = 14, topic: str = "events") -> ViewData:  # fmt: skip
    """Read the view's data: the day (default: the newest validated one) and the `days` before it. Reads only
    (no schema work on a page view: the writers create the tables)."""
    with storage.transaction(url) as cur:
        cur.execute("SELECT max(day) FROM quality.accuracy_history")
        newest = cur.fetchone()[0]
    day = day or newest
    kinds = {m.name: m.kind for m in defs.metrics}
    if day is None:
        return ViewData(None, days, decision_days, {}, {}, [], [], [], kinds, report_url)
    by_metric, rejected = alerts.history(url, day, topic)
    since = day - timedelta(days=max(days, decision_days) - 1)
    history = {m: [r for r in rows if r["day"] >= since] for m, rows in by_metric.items() if m in kinds}
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT metric, group_key, window_start, batch_value, stream_value, error, tolerance, batch_events,
                      stream_events, n_lost, n_dup, n_late, sketch_effect
               FROM quality.comparison WHERE day = %s
               ORDER BY (stream_value IS NULL) DESC, (error > tolerance) DESC NULLS LAST,
                        error / nullif(tolerance, 0) DESC NULLS FIRST, error DESC NULLS LAST
               LIMIT 15""",
            (day,),
        )
        names = [c.name for c in cur.description]
        worst = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        cur.execute(
            """SELECT t.metric, t.day, max(s.value / nullif(t.value, 0)) AS ff_ffd_max,
                      avg(s.value / nullif(t.value, 0)) AS ff_ffd_mean,
                      max(s.value / nullif((t.detail ->> 'lower_bound')::float, 0)) AS ff_lb_max
               FROM truth.results t JOIN stream.results s USING (metric, group_key, window_start)
               WHERE t.metric = ANY(%s) AND t.day BETWEEN %s AND %s
               GROUP BY t.metric, t.day ORDER BY t.metric, t.day""",
            ([m for m, k in kinds.items() if k == "binpack"], since, day),
        )
        names = [c.name for c in cur.description]
        binpack = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    recent = [a for a in alerts.recent(url, days, today=day) if a["day"] <= day]
    aggregates = {m.name: m.aggregate for m in defs.metrics}
    versions, version_metrics = _version_runs(url)
    return ViewData(
        day, days, decision_days, history, rejected, recent, worst, binpack, kinds, report_url, aggregates,
        versions, version_metrics,
    )  # fmt: skip


def _version_runs(url: str, limit: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The newest Kappa comparisons (quality.version_runs) and the per-metric rows of the newest finished one;
    nothing on a database whose schema predates them (a page view does no schema work)."""
    import psycopg2

    from batchmark import kappa

    try:
        runs = kappa.latest(url, limit)
    except psycopg2.errors.UndefinedTable:
        return [], []
    done = next((r for r in runs if r["status"] == "done"), None)
    if done is None:
        return runs, []
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT metric, kind, windows, stable_max_error, stable_mean_error, candidate_max_error,
                      candidate_mean_error, worse_windows, better_windows, same_windows, p_value, verdict, cause
               FROM quality.version_comparison WHERE run_id = %s ORDER BY metric""",
            (done["run_id"],),
        )
        names = [c.name for c in cur.description]
        return runs, [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def cause(row: dict[str, Any]) -> str:
    """The largest reason a window differs: missing, lost, late, duplicated, the sketch, or none."""
    if row.get("stream_value") is None:
        return "missing from the stream"
    counts = {"lost": row.get("n_lost") or 0, "late": row.get("n_late") or 0, "duplicated": row.get("n_dup") or 0}
    top = max(counts, key=lambda k: counts[k])
    if counts[top]:
        return f"{counts[top]} {top} events"
    return "the sketch" if row.get("sketch_effect") else "-"


def open_alerts(data: ViewData) -> dict[str, list[str]]:
    """metric -> the checks whose newest alert left them in a warning or error state."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for a in sorted(data.alerts, key=lambda a: (a["day"], a["id"])):
        newest[(a["metric"], a["check_name"])] = a
    out: dict[str, list[str]] = {}
    for (metric, check), a in newest.items():
        if a["severity"] != "recovered":
            out.setdefault(metric, []).append(f"{check} ({a['severity']})")
    return out


def charts(data: ViewData) -> dict[str, dict[str, Any]]:
    """The Vega-Lite specs, by chart id: error-<metric>, causes-<metric>, binpack-<metric>."""
    import altair as alt
    import pandas as pd

    out: dict[str, dict[str, Any]] = {}
    for metric, rows in data.history.items():
        rows = [r for r in rows if r["day"] > data.day - timedelta(days=data.days)]
        if not rows:
            continue
        frame = pd.DataFrame(
            {
                "day": [r["day"].isoformat() for r in rows],
                "mean error": [r["mean_error"] for r in rows],
                "max error": [r["max_error"] for r in rows],
                "tolerance": [r["tolerance"] for r in rows],
            }
        )
        long = frame.melt(["day", "tolerance"], ["mean error", "max error"], "figure", "error").dropna()
        base = alt.Chart(long).encode(x=alt.X("day:O", title=None, axis=alt.Axis(labelAngle=-45)))
        lines = base.mark_line(point=True).encode(
            y=alt.Y("error:Q", title=data_error_title(data.kinds.get(metric, ""))),
            color=alt.Color("figure:N", legend=alt.Legend(orient="top", title=None)),
            tooltip=["day:O", "figure:N", alt.Tooltip("error:Q", format=".4g")],
        )
        band = alt.Chart(frame).mark_rule(color="#c0392b", strokeDash=[4, 3]).encode(y="tolerance:Q")
        fired = [a for a in data.alerts if a["metric"] == metric and a["severity"] != "recovered"]
        layers = [band, lines]
        if fired:
            marks = pd.DataFrame(
                {
                    "day": [a["day"].isoformat() for a in fired],
                    "alert": [f"{a['check_name']} ({a['severity']})" for a in fired],
                }
            )
            layers.append(
                alt.Chart(marks)
                .mark_rule(color="#e67e22", strokeWidth=2)
                .encode(x="day:O", tooltip=["day:O", "alert:N"])
            )
        out[f"error-{metric}"] = alt.layer(*layers).properties(width="container", height=160).to_dict()

        causes = pd.DataFrame(
            [
                {"day": r["day"].isoformat(), "cause": what, "events": int(r[key] or 0)}
                for r in rows
                for key, what in (
                    ("late", "late"),
                    ("lost", "lost"),
                    ("duplicate", "duplicated"),
                    ("rejected", "rejected"),
                )
            ]
        )
        out[f"causes-{metric}"] = (
            alt.Chart(causes)
            .mark_bar()
            .encode(
                x=alt.X("day:O", title=None, axis=alt.Axis(labelAngle=-45)),
                y=alt.Y("events:Q", title="events"),
                color=alt.Color("cause:N", legend=alt.Legend(orient="top", title=None)),
                tooltip=["day:O", "cause:N", "events:Q"],
            )
            .properties(width="container", height=120)
            .to_dict()
        )
    for metric in sorted({r["metric"] for r in data.binpack}):
        rows = [r for r in data.binpack if r["metric"] == metric]
        frame = pd.DataFrame(
            [
                {"day": r["day"].isoformat(), "ratio": what, "value": r[key]}
                for r in rows
                for key, what in (
                    ("ff_ffd_max", "FF/FFD (worst window)"),
                    ("ff_ffd_mean", "FF/FFD (mean)"),
                    ("ff_lb_max", "FF/lower bound (worst)"),
                )  # fmt: skip
                if r[key] is not None
            ]
        )
        bound = (
            alt.Chart(pd.DataFrame({"bound": [BINPACK_BOUND, 1.0]})).mark_rule(strokeDash=[4, 3]).encode(y="bound:Q")
        )
        line = (
            alt.Chart(frame)
            .mark_line(point=True)
            .encode(
                x=alt.X("day:O", title=None, axis=alt.Axis(labelAngle=-45)),
                y=alt.Y("value:Q", title="bins: stream / offline"),
                color=alt.Color("ratio:N", legend=alt.Legend(orient="top", title=None)),
                tooltip=["day:O", "ratio:N", alt.Tooltip("value:Q", format=".3f")],
            )
        )
        out[f"binpack-{metric}"] = alt.layer(bound, line).properties(width="container", height=160).to_dict()
    return out


def data_error_title(kind: str) -> str:
    """The axis title of a kind's error (the kind's error_name)."""
    from batchmark.aggregates import AGGREGATES

    cls = AGGREGATES.get(kind)
    return cls.error_name if cls else "relative error"


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(data: ViewData, inline: bool = False, assets: str = "static/vendor", page_url: str = "") -> str:
    """The page. inline=True: styles and scripts inside the file (a self-contained report); otherwise they are
    loaded from `assets` (the plugin's vendored files)."""
    if inline:
        head = f"<style>{(VENDOR / STYLE).read_text()}</style>" + "".join(
            f"<script>{(VENDOR / s).read_text()}</script>" for s in SCRIPTS
        )
    else:
        head = f'<link rel="stylesheet" href="{assets}/{STYLE}">' + "".join(
            f'<script src="{assets}/{s}"></script>' for s in SCRIPTS
        )
    title = f"Stream accuracy, {data.day.isoformat()}" if data.day else "Stream accuracy"
    body = [f'<h1 class="h3 mt-3">{_e(title)}</h1>']
    if data.day is None:
        body.append("<p>No validation recorded yet: run nightly_recompute for a day; validate_accuracy follows.</p>")
        return _page(title, head, "".join(body), {})
    body.append(_day_picker(data, page_url))
    if not inline:
        body.append('<p><a href="live">Open windows, live</a>: what the stream is computing right now.</p>')
    body.append(_overview(data))
    specs = charts(data)
    for metric in data.history:
        body.append(f'<h2 class="h5 mt-4" id="m-{_e(metric)}">{_e(metric)} <small class="text-muted">'
                    f"{_e(data.kinds.get(metric))}</small></h2>")  # fmt: skip
        for kind in ("error", "causes", "binpack"):
            if f"{kind}-{metric}" in specs:
                body.append(f'<div class="chart" id="chart-{kind}-{_e(metric)}" style="width: 100%"></div>')
    body.append(_worst(data))
    body.append(_alerts(data))
    body.append(_versions(data))
    return _page(title, head, "".join(body), specs)


def _day_picker(data: ViewData, page_url: str) -> str:
    return (
        f'<form class="form-inline mb-3" method="get" action="{_e(page_url)}">'
        f'<label class="mr-2" for="day">Day</label><input class="form-control mr-2" type="date" id="day" name="day" '
        f'value="{data.day.isoformat()}"><label class="mr-2" for="days">days of history</label>'
        f'<input class="form-control mr-2" type="number" min="1" max="400" id="days" name="days" value="{data.days}">'
        '<button class="btn btn-primary" type="submit">Show</button></form>'
    )


def _overview(data: ViewData) -> str:
    opened = open_alerts(data)
    rows = []
    for metric, hist in data.history.items():
        today = [r for r in hist if r["day"] == data.day]
        agg = data.aggregates.get(metric)
        verdict, evidence = drift.decision(
            hist, data.decision_days, agg.bound() if agg else 0.0, agg.error_name if agg else "error"
        )
        if not today:
            rows.append(f"<tr><td>{_e(metric)}</td><td colspan=9>not validated on {data.day}</td></tr>")
            continue
        r = today[0]
        ok = r["within_tolerance"] and not (r["missing"] or r["incomplete"] or r["impossible"])
        status = (
            '<span class="badge badge-success">PASS</span>' if ok else '<span class="badge badge-danger">FAIL</span>'
        )
        causes = alerts.causes_text(r, data.rejected.get(data.day, 0), short=True)
        page = r.get("report_page")
        link = f'<a href="{_e(data.report_url)}/{_e(page)}">Data Docs</a>' if page else "-"
        rows.append(
            f'<tr data-metric="{_e(metric)}"><td><a href="#m-{_e(metric)}">{_e(metric)}</a></td><td>{status}</td>'
            f"<td>{_g(r['max_error'])} / {_g(r['tolerance'])}</td><td>{r['windows']}</td><td>{r['missing']}</td>"
            f"<td>{r['over_tolerance']}</td><td>{r['incomplete'] + r['impossible']}</td><td>{_e(causes)}</td>"
            f"<td>{_e(', '.join(opened.get(metric, [])) or '-')}</td>"
            f'<td title="{_e(evidence)}">{_e(verdict)}<br><small class="text-muted">{_e(evidence)}</small></td>'
            f"<td>{link}</td></tr>"
        )
    return (
        '<table class="table table-sm" id="overview"><thead><tr><th>metric</th><th>status</th>'
        "<th>max error / tolerance</th><th>windows</th><th>missing</th><th>over tolerance</th><th>incomplete</th>"
        f"<th>causes</th><th>open alerts</th><th>decision (last {data.decision_days} days)</th><th>report</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _worst(data: ViewData) -> str:
    rows = "".join(
        f"<tr><td>{_e(w['metric'])}</td><td>{_e(w['group_key'])}</td><td>{_e(w['window_start'])}</td>"
        f"<td>{_g(w['stream_value'])}</td><td>{_g(w['batch_value'])}</td><td>{_g(w['error'])}</td>"
        f"<td>{_e(cause(w))}</td></tr>"
        for w in data.worst
    )
    return (
        '<h2 class="h5 mt-4">Worst windows of the day</h2><table class="table table-sm" id="worst"><thead><tr>'
        "<th>metric</th><th>group</th><th>window</th><th>stream</th><th>truth</th><th>error</th><th>cause</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def _versions(data: ViewData) -> str:
    """The Kappa comparisons: the newest runs with their verdicts, and the newest finished one per metric."""
    if not data.versions:
        return (
            '<h2 class="h5 mt-4" id="versions">Version comparisons</h2><p class="text-muted">None yet: trigger '
            "replay_benchmark (or run <code>batchmark compare-versions</code>) to replay a stored day into a "
            "candidate version of the stream.</p>"
        )
    runs = "".join(
        f"<tr><td>{_e(r['run_id'])}</td><td>{_e(r['started_at'].strftime('%Y-%m-%d %H:%M'))}</td>"
        f"<td>{_e(r['source'])}</td><td>{_e(r['stable'])} &rarr; {_e(r['candidate'])}</td><td>{_e(r['status'])}</td>"
        f"<td>{_e(r['verdict'] or '-')}</td></tr>"
        for r in data.versions
    )
    out = (
        '<h2 class="h5 mt-4" id="versions">Version comparisons</h2><table class="table table-sm" id="version-runs">'
        "<thead><tr><th>run</th><th>started</th><th>source</th><th>stable &rarr; candidate</th><th>status</th>"
        f"<th>verdict</th></tr></thead><tbody>{runs}</tbody></table>"
    )
    if data.version_metrics:
        done = next(r for r in data.versions if r["status"] == "done")
        rows = "".join(
            f'<tr data-metric="{_e(m["metric"])}"><td>{_e(m["metric"])}</td><td>{_e(m["kind"])}</td>'
            f"<td>{m['windows']}</td><td>{_g(m['stable_max_error'])} / {_g(m['stable_mean_error'])}</td>"
            f"<td>{_g(m['candidate_max_error'])} / {_g(m['candidate_mean_error'])}</td>"
            f"<td>{m['worse_windows']} / {m['better_windows']} / {m['same_windows']}</td><td>{m['p_value']:.2g}</td>"
            f"<td>{_e(m['verdict'])}{'' if m['verdict'] == 'same' else ' (' + _e(m['cause']) + ')'}</td></tr>"
            for m in data.version_metrics
        )
        out += (
            f"<p>Run {_e(done['run_id'])}, per metric (errors against the truth of the replayed records; "
            "windows where the candidate is worse / better / the same; exact two-sided sign test):</p>"
            '<table class="table table-sm" id="version-metrics"><thead><tr><th>metric</th><th>kind</th>'
            "<th>windows</th><th>stable max / mean error</th><th>candidate max / mean error</th>"
            f"<th>worse / better / same</th><th>p</th><th>verdict</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return out


def _alerts(data: ViewData) -> str:
    rows = "".join(
        f"<tr><td>{a['day']}</td><td>{_e(a['severity'])}</td><td>{_e(a['metric'])}</td><td>{_e(a['check_name'])}"
        f"</td><td>{_e(a['delivery_status'])}</td><td>{_e(', '.join(a['delivered_to']) or '-')}</td></tr>"
        for a in data.alerts
    )
    return (
        f'<h2 class="h5 mt-4">Alerts of the last {data.days} days</h2><table class="table table-sm" id="alerts">'
        "<thead><tr><th>day</th><th>severity</th><th>metric</th><th>check</th><th>delivery</th><th>to</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _page(title: str, head: str, body: str, specs: dict[str, Any]) -> str:
    script = (
        "<script>window.bmCharts = {}; window.bmReady = Promise.all(Object.entries("
        + json.dumps(specs, default=str).replace("</", "<\\/")
        + ").map(([id, spec]) => vegaEmbed('#chart-' + id, spec,"
        " {renderer: 'svg', actions: false, logLevel: vega.Error}).then(r => { window.bmCharts[id] = r.view; })));"
        "</script>"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>{head}</head>'
        f'<body><div class="container-fluid">{body}</div>{script if specs else ""}</body></html>'
    )


# -- live: the windows the stream holds open now --------------------------------------------------------------

LIVE_REFRESH_MS = 2000
STALE_AFTER_S = 600  # rows a worker has not refreshed for 10 minutes (it stopped, or gave the partition up)


def live_rows(url: str, limit: int = 500) -> dict[str, Any]:
    """The open windows with their provisional values (stream.open_windows), newest windows first, and the
    partitions' watermarks: what the live page polls."""
    with storage.transaction(url) as cur:
        cur.execute(
            """SELECT metric, group_key, window_start, window_end, value, n_events, updated_at
               FROM stream.open_windows WHERE updated_at > now() - %s * interval '1 second'
               ORDER BY window_start DESC, metric, group_key LIMIT %s""",
            (STALE_AFTER_S, limit),
        )
        rows = [
            {"metric": m, "group": g, "window_start": s.isoformat(), "window_end": e.isoformat(),
             "value": v if v is not None and math.isfinite(v) else None, "events": n, "updated_at": u.isoformat()}
            for m, g, s, e, v, n, u in cur.fetchall()
        ]  # fmt: skip
        cur.execute("SELECT topic, partition, watermark_ms, updated_at FROM stream.checkpoints ORDER BY 1, 2")
        marks = [{"topic": t, "partition": p, "watermark_ms": w, "updated_at": u.isoformat()} for t, p, w, u in cur]
    return {"windows": rows, "partitions": marks}


def render_live(assets: str = "static/vendor", source: str = "live.json") -> str:
    """The live page: a table of open windows that refreshes itself every two seconds (no reload)."""
    script = f"""
<script>
window.bmLive = {{polls: 0}};
async function poll() {{
  const r = await fetch({json.dumps(source)}, {{credentials: 'same-origin', headers: {{Accept: 'application/json'}}}});
  if (!r.ok) {{ document.getElementById('status').innerText = 'refresh failed: HTTP ' + r.status; return; }}
  const data = await r.json();
  const body = document.querySelector('#live tbody');
  body.innerHTML = '';
  for (const w of data.windows) {{
    const tr = document.createElement('tr');
    tr.dataset.key = w.metric + '|' + w.group + '|' + w.window_start;
    for (const v of [w.metric, w.group, w.window_start, w.window_end,
                     w.value === null ? '-' : Number(w.value).toPrecision(6), w.events, w.updated_at]) {{
      const td = document.createElement('td'); td.innerText = v; tr.appendChild(td);
    }}
    body.appendChild(tr);
  }}
  window.bmLive.polls += 1;
  window.bmLive.windows = data.windows;
  document.getElementById('status').innerText =
    data.windows.length + ' open windows; refreshed ' + new Date().toLocaleTimeString() + ' (every 2 s)';
}}
poll(); setInterval(poll, {LIVE_REFRESH_MS});
</script>"""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Open windows (live)</title>'
        f'<link rel="stylesheet" href="{assets}/{STYLE}"></head><body><div class="container-fluid">'
        '<h1 class="h3 mt-3">Open windows, live</h1><p class="text-muted">The windows the stream holds open and '
        "their values so far (provisional: final when the window closes and its row reaches stream.results). "
        '<a href="accuracy">Accuracy view</a></p><p id="status">loading ...</p>'
        '<table class="table table-sm" id="live"><thead><tr><th>metric</th><th>group</th><th>window start</th>'
        "<th>window end</th><th>value so far</th><th>events</th><th>updated</th></tr></thead><tbody></tbody>"
        f"</table></div>{script}</body></html>"
    )
