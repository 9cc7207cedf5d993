"""The ``batchmark`` command line: every step of the pipeline, and ``demo`` to run them all on one day."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from batchmark import config
from batchmark.errors import BatchmarkError, ConfigError


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 0.5")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive whole number")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port between 1024 and 65535")
    return value


def _add_generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=_positive, default=100_000, help="events in the day (default 100000)")
    p.add_argument("--tenants", type=_positive, default=8)
    p.add_argument("--users-per-tenant", type=_positive, default=500)
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of tenant/user popularity")
    p.add_argument("--out-of-order", type=_share, default=0.05, help="share delayed within the lateness")
    p.add_argument("--late", type=_share, default=0.0, help="share delayed past the allowed lateness")
    p.add_argument("--duplicates", type=_share, default=0.0, help="share sent twice")
    p.add_argument("--malformed", type=_share, default=0.001, help="share of malformed records")
    p.add_argument("--lost", type=_share, default=0.0, help="share kept in the archive but never sent to the stream")
    p.add_argument("--seed", type=int, default=7)


def _generator_config(args: argparse.Namespace, day):  # noqa: ANN001, ANN202
    from batchmark.definitions import load_definitions
    from batchmark.generator import GeneratorConfig

    defs = load_definitions(config.load().definitions_path)
    return GeneratorConfig(
        day=day,
        events=args.events,
        tenants=args.tenants,
        users_per_tenant=args.users_per_tenant,
        skew=args.skew,
        out_of_order=args.out_of_order,
        late=args.late,
        duplicates=args.duplicates,
        malformed=args.malformed,
        seed=args.seed,
        lost=args.lost,
        partitions=config.load().partitions,
        lateness_ms=max(m.allowed_lateness_ms for m in defs.metrics),
        window_ms=max(m.window_ms for m in defs.metrics),
    )


def cmd_init_db(args: argparse.Namespace) -> int:
    from batchmark import storage

    url = config.load().database_url
    storage.ensure_database(url)
    print(f"schema ready in {storage.db_name(url)}")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from batchmark.broker import EmbeddedBroker, create_topics, settings_topics

    s = config.load()
    # Ctrl-C and SIGTERM only set a flag: an exception raised by a handler could land anywhere, even between the
    # ready line and the wait, and skip the child's shutdown.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    with EmbeddedBroker(port=args.port) as broker:
        create_topics(broker.bootstrap, settings_topics(s), keyed=(s.events_topic,))
        print(f"embedded broker on {broker.bootstrap} (topics {s.events_topic}, {s.dlq_topic}); Ctrl-C stops it")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        while broker.proc and broker.proc.poll() is None and not stop.wait(1):
            pass
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from batchmark.broker import ensure_settings_topics

    s = config.load()
    ensure_settings_topics(s)
    print(f"topics {s.events_topic} ({s.partitions} partitions) and {s.dlq_topic} exist on {s.bootstrap_servers}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from batchmark.generator import generate
    from batchmark.windows import parse_day

    archive = Path(args.archive) if args.archive else None
    manifest = generate(_generator_config(args, parse_day(args.date)), Path(args.out), archive=archive)
    print(
        f"wrote {manifest.records} records to {args.out}: {manifest.malformed} malformed, {manifest.late} late, "
        f"{manifest.duplicates} duplicates"
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from batchmark.broker import create_topics
    from batchmark.definitions import load_definitions
    from batchmark.replay import replay

    s = config.load()
    path = Path(args.file)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    topic = args.topic or s.events_topic
    defs = load_definitions(s.definitions_path)
    create_topics(s.bootstrap_servers, {topic: s.partitions}, keyed=(topic,))
    stats = replay(path, s.bootstrap_servers, topic, defs, rate=args.rate, end_watermark=not args.no_end_watermark)
    print(f"replayed {stats.records} records in {stats.seconds:.1f}s to {topic}")
    if stats.rejected:
        reasons = ", ".join(f"{reason} {n}" for reason, n in stats.rejected.most_common())
        print(
            f"{sum(stats.rejected.values())} of them do not fit {defs.source} and go to the dead-letter topic "
            f"({reasons}); e.g. {stats.example}. `batchmark dlq` lists them."
        )
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from batchmark import dlq, storage

    s = config.load()
    topic = args.topic or s.dlq_topic
    letters = dlq.read(s.bootstrap_servers, topic, reason=args.reason, contains=args.contains)
    if args.show:
        return _dlq_show(topic, letters, set(args.show))
    storage.ensure_database(s.database_url)
    storage.init_schema(s.database_url)
    if args.redrive:
        return _dlq_redrive(s, topic, letters, args.redrive)
    return _dlq_list(s, topic, letters, args.limit)


def _dlq_show(topic: str, letters: list, wanted: set[str]) -> int:
    """`batchmark dlq --show P ...`: each chosen dead letter whole."""
    from batchmark import dlq

    picked = [d for d in letters if d.position in wanted]
    unknown = wanted - {d.position for d in picked}
    if unknown:
        raise ConfigError(f"no dead letter at {', '.join(sorted(unknown))} in {topic} (see `batchmark dlq`)")
    for d in picked:
        print(f"dead letter {d.position} of {topic}")
        print(f"  reason   {d.reason}: {d.detail}")
        print(f"  from     {d.topic} partition {d.partition} offset {d.offset}")
        cut = " (cut: only the first part was kept)" if d.truncated else ""
        print(f"  raw      {d.raw_bytes} bytes{cut}")
        print(f"  preview  {dlq.preview(d.raw, limit=2000)}")
    return 0


def _dlq_redrive(s: config.Settings, topic: str, letters: list, positions: list[str]) -> int:
    """`batchmark dlq --redrive P ...|all`: send the chosen ones the definitions now accept back, once each."""
    from batchmark import dlq
    from batchmark.definitions import load_definitions

    chosen = letters if positions == ["all"] else [d for d in letters if d.position in set(positions)]
    if not chosen:
        raise ConfigError("nothing to re-drive: name positions from `batchmark dlq` (e.g. 0:12), or 'all'")
    defs = load_definitions(s.definitions_path)
    out = dlq.redrive(s.database_url, s.bootstrap_servers, topic, defs, chosen)
    sources = {d.position: d.topic for d in chosen}
    for pos, event_id in out.sent.items():
        print(f"re-driven {pos} -> {sources[pos]} (event id {event_id})")
    for pos, why in out.skipped.items():
        print(f"not re-driven {pos}: {why}")
    print(f"{len(out.sent)} re-driven, {len(out.skipped)} not")
    if out.sent:
        print(
            "The worker checks them with the definitions it started with (restart it with the fixed file if it is "
            "not running them yet); recompute their days once it has landed them, so the truth includes them."
        )
    return 0 if out.sent else 1


def _dlq_list(s: config.Settings, topic: str, letters: list, limit: int) -> int:
    """`batchmark dlq`: the count by reason, then the last `limit` dead letters, a line each."""
    from collections import Counter

    from batchmark import dlq

    done = dlq.redriven_sources(s.database_url)
    shown = letters[-limit:]
    more = f" (the last {len(shown)} shown)" if len(shown) < len(letters) else ""
    print(f"{len(letters)} dead letters in {topic}{more}")
    if letters:
        counts = Counter(d.reason for d in letters)
        print("by reason: " + ", ".join(f"{r} {n}" for r, n in counts.most_common()))
        print(f"{'position':>10}  {'reason':<15} {'from':<14} detail | raw preview")
    for d in shown:
        mark = " [re-driven]" if d.source in done else ""
        print(
            f"{d.position:>10}  {d.reason:<15} {f'{d.partition}:{d.offset}':<14} "
            f"{dlq.preview(d.detail.encode(), 60)} | {dlq.preview(d.raw, 80)}{mark}"
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    faust = str(Path(sys.executable).parent / "faust")
    os.execv(faust, [faust, "-A", "streaming.app", "worker", "--without-web", "-l", args.loglevel])
    return 0  # not reached


def cmd_recompute(args: argparse.Namespace) -> int:
    import uuid

    from batchmark import spark
    from batchmark.windows import parse_day

    result = spark.submit(config.load(), parse_day(args.date), args.run_id or f"cli-{uuid.uuid4().hex[:8]}")
    print(json.dumps(result, indent=1))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from batchmark import validation
    from batchmark.definitions import load_definitions
    from batchmark.windows import parse_day

    s = config.load()
    defs = load_definitions(s.definitions_path)
    defs = defs.only(args.metric or [])
    report = validation.validate_day(s, defs, parse_day(args.date))
    print(report.summary_line())
    print(f"report: {report.docs_index}")
    return 0 if report.success else 1


def cmd_alerts(args: argparse.Namespace) -> int:
    from batchmark import alerts
    from batchmark.definitions import load_definitions
    from batchmark.windows import parse_day

    s = config.load()
    if args.date:
        recorded = alerts.evaluate_day(s, load_definitions(s.definitions_path), parse_day(args.date))
        print(f"{len(recorded)} new alerts for {args.date}" + "".join(f"\n  {a.title}" for a in recorded))
    if args.date or args.deliver:
        if not s.alert_channels:
            print(
                "no alert channel configured: set BATCHMARK_ALERT_CHANNELS to Airflow connection ids (README, Alerts)"
            )
        print(f"deliveries: {alerts.deliver_pending(s).line()}")
        return 0
    rows = alerts.recent(s.database_url, args.days)
    if not rows:
        print(f"no alerts in the last {args.days} days")
    for r in rows:
        sent = ", ".join(r["delivered_to"]) or "-"
        print(
            f"{r['day']}  {r['severity']:<9} {r['metric']} {r['check_name']:<15} {r['delivery_status']:<10} "
            f"to {sent}" + (f"  (last error: {r['last_error']})" if r["last_error"] else "")
        )
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from batchmark.definitions import STABLE, load_definitions

    s = config.load()
    defs = load_definitions(s.definitions_path)
    print(f"versions of the streaming app in {defs.source}:")
    for label in (STABLE, *(v.label for v in defs.versions)):
        v = defs.version_spec(label)
        load_definitions(s.definitions_path, version=label)  # refused here, with what to fix, if it does not load
        print(f"  {label:20} {v.description or '-'}\n  {'':20} changes: {v.changes()}")
    return 0


def cmd_compare_versions(args: argparse.Namespace) -> int:
    import json

    from batchmark import kappa

    s = config.load()
    result = kappa.compare_versions(
        s, args.source, args.candidate, stable=args.stable, rate=args.rate, timeout_s=args.timeout, keep=args.keep
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=1, default=str))
        return 0
    print(f"run {result.run_id}: {result.events:,} records of {result.source}")
    for label, change in result.changes.items():
        print(f"  {label}: {change}")
    print(result.table())
    print(result.verdict)
    print(f"stored in quality.version_comparison (run_id {result.run_id!r}); JSON: {result.path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from batchmark import accuracy_view
    from batchmark.definitions import load_definitions
    from batchmark.windows import parse_day

    s = config.load()
    day = parse_day(args.date) if args.date else None
    if args.days < 1 or args.days > 400:
        raise ConfigError(f"--days must be between 1 and 400, not {args.days}")
    data = accuracy_view.load(
        s.database_url,
        load_definitions(s.definitions_path),
        s.report_url,
        day,
        args.days,
        s.decision_days,
        s.events_topic,
    )
    if data.day is None:
        raise ConfigError("no validation recorded yet: validate a day first (batchmark validate --date D)")
    if day is not None and not any(r["day"] == day for rows in data.history.values() for r in rows):
        raise ConfigError(f"{day} was not validated: run the recompute and the validation for it first")
    out = Path(args.out)
    out.write_text(accuracy_view.render(data, inline=True), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, self-contained: opens with no network) for {data.day}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from batchmark import stack

    if args.detach:
        return stack.run_up_detached(args.port, args.broker_port)
    return stack.run_up(args.port, args.broker_port)


def cmd_down(args: argparse.Namespace) -> int:
    from batchmark import stack

    return stack.run_down()


def cmd_init_airflow(args: argparse.Namespace) -> int:
    from batchmark.airflow_env import SPARK_CONN_ID, migrate

    settings = config.load()
    migrate(settings)
    print(f"Airflow metadata DB migrated; connection {SPARK_CONN_ID} in place (a new one gets {settings.spark_master})")
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from batchmark import stack
    from batchmark.airflow_env import airflow_bin

    settings = config.load()
    state = stack.read_state(settings) or {}
    port = int(str(state.get("api_url", "http://127.0.0.1:8080")).rsplit(":", 1)[1])
    env = {**os.environ, **stack.stack_airflow_env(settings, port)}
    os.execve(airflow_bin(), [airflow_bin(), *args.airflow_args], env)
    return 0  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from batchmark.demo import run_demo
    from batchmark.windows import parse_day, yesterday

    day = parse_day(args.date) if args.date else yesterday()
    return run_demo(day, _generator_config(args, day), keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchmark", description="Batch is the benchmark of streaming.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="one day through every component, on embedded defaults")
    p.add_argument("--date", help="the day to generate and benchmark, YYYY-MM-DD (default: yesterday)")
    p.add_argument("--keep", action="store_true", help="leave the broker and the worker running at the end")
    _add_generator_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "up",
        help="start the local stack on 127.0.0.1 (broker, Faust worker, Airflow UI/scheduler/...); Ctrl-C stops it",
    )
    p.add_argument("--port", type=_port, default=8080, help="the Airflow UI / API server port (default 8080)")
    p.add_argument("--broker-port", type=_port, default=19092, help="the embedded broker's port (default 19092)")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background; `batchmark down` stops it")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the stack `batchmark up` started from this BATCHMARK_HOME").set_defaults(
        fn=cmd_down
    )

    p = sub.add_parser(
        "airflow",
        help="the airflow CLI with this home's settings, e.g. `batchmark airflow backfill create --dag-id ...`",
    )
    p.add_argument("airflow_args", nargs=argparse.REMAINDER, help="arguments for `airflow`")
    p.set_defaults(fn=cmd_airflow)

    sub.add_parser("init-db", help="create the database and its schema").set_defaults(fn=cmd_init_db)
    sub.add_parser(
        "init-airflow", help="migrate Airflow's metadata DB and create the Spark connection (batchmark_spark)"
    ).set_defaults(fn=cmd_init_airflow)
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) in the foreground")
    p.add_argument("--port", type=_port, default=19092)
    p.set_defaults(fn=cmd_broker)
    sub.add_parser("topics", help="create the events and dead-letter topics").set_defaults(fn=cmd_topics)

    p = sub.add_parser("generate", help="write a synthetic day of cluster-job events as JSONL")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument(
        "--archive",
        help="also write the day's system of record here (every valid event once); "
        "put it at $BATCHMARK_ARCHIVE/events-DATE.jsonl for the recompute to use it",
    )
    _add_generator_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("replay", help="send a JSONL, CSV or Parquet file record by record into the events topic")
    p.add_argument("file")
    p.add_argument("--rate", type=float, default=None, help="at most this many records per second")
    p.add_argument("--topic", default=None)
    p.add_argument("--no-end-watermark", action="store_true", help="do not close the replayed days at the end")
    p.set_defaults(fn=cmd_replay)

    p = sub.add_parser(
        "dlq",
        help="list, show and re-drive dead letters (records the worker rejected, with their reason)",
        description="Without options: every dead letter, a line each (position, reason, source partition:offset, "
        "detail, a safe preview of the raw bytes). --show prints chosen ones whole; --redrive sends chosen ones "
        "back to the events topic once the definitions accept them (byte for byte: same event id; each once).",
    )
    p.add_argument("--reason", help="only this reason, e.g. missing_field")
    p.add_argument("--contains", help="only dead letters whose detail or raw bytes contain this text")
    p.add_argument("--limit", type=_positive, default=50, help="show the last N (default 50)")
    p.add_argument("--show", nargs="+", metavar="POSITION", help="print these dead letters whole, e.g. 0:12")
    p.add_argument(
        "--redrive", nargs="+", metavar="POSITION", help="re-drive these positions, or 'all' (of the filter)"
    )
    p.add_argument("--topic", help="the dead-letter topic (default BATCHMARK_DLQ_TOPIC, i.e. <events topic>.dlq)")
    p.set_defaults(fn=cmd_dlq)

    p = sub.add_parser("worker", help="run the Faust stream worker (faust -A streaming.app worker)")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("recompute", help="Spark: exact metrics of one day from the lake -> batch truth")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--run-id", default=None)
    p.set_defaults(fn=cmd_recompute)

    p = sub.add_parser("validate", help="GX: compare one day's stream results with the batch truth")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--metric", action="append", help="validate only this metric (repeatable; default: all)")
    p.set_defaults(fn=cmd_validate)

    sub.add_parser(
        "versions", help="list the versions of the streaming app ([[version]] in the definitions) and what they change"
    ).set_defaults(fn=cmd_versions)

    p = sub.add_parser(
        "compare-versions",
        help="Kappa: replay a stored day into two versions of the streaming app and compare them against the truth",
    )
    p.add_argument(
        "--source", required=True, help="a day of the lake (YYYY-MM-DD; its archive if there is one) or a stored file"
    )
    p.add_argument("--candidate", required=True, help="the version to judge (a [[version]] label)")
    p.add_argument("--stable", default="stable", help="the version to judge it against (default: stable)")
    p.add_argument("--rate", type=float, help="replay at this many records/s (default: as fast as possible)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for both versions (default 1800)")
    p.add_argument("--json", action="store_true", help="print the whole comparison as JSON")
    p.add_argument("--keep", action="store_true", help="keep the versions' lakes under $BATCHMARK_HOME/kappa/")
    p.set_defaults(fn=cmd_compare_versions)

    p = sub.add_parser("report", help="write the Accuracy view of a day as one self-contained HTML file")
    p.add_argument("--date", help="the day in focus, YYYY-MM-DD (default: the newest validated day)")
    p.add_argument("--days", type=int, default=30, help="days of history in the charts (default 30)")
    p.add_argument("-o", "--out", default="accuracy-report.html", help="the HTML file to write")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser(
        "alerts",
        help="list recent accuracy alerts and their delivery; --date records a validated day's alerts and sends them",
    )
    p.add_argument("--date", help="record the alerts of this validated day (YYYY-MM-DD), then send pending ones")
    p.add_argument("--deliver", action="store_true", help="send every pending alert that is due")
    p.add_argument("--days", type=int, default=30, help="list the alerts of this many days (default 30)")
    p.set_defaults(fn=cmd_alerts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BatchmarkError as exc:
        print(f"batchmark: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
