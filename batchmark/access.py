"""Postgres roles with least privilege: one per writer, so no writer can change another's results.

=====================  ==========================================  =============================================
role                   writes                                      reads
=====================  ==========================================  =============================================
``batchmark_stream``   stream.* (results, late_events,             stream.*
                       checkpoints, rejections, redriven)
``batchmark_batch``    truth.results, truth.staging,               stream.results (the stream's values beside
                       truth.recomputed, quality.window_accuracy   the truth), truth.results,
                                                                   quality.window_accuracy
``batchmark_quality``  quality.metrics, quality.accuracy_history,  quality.* (incl. the view quality.comparison),
                       quality.task_failures                       truth.results, stream.results
=====================  ==========================================  =============================================

Nothing else: no role owns a table, can create objects, or writes another schema. Run
``python -m batchmark.access`` as the database owner (``DATABASE_URL``) after ``batchmark init-db`` and after
every schema upgrade; then give each process its role in its own ``DATABASE_URL``. Passwords come from
``BATCHMARK_STREAM_PASSWORD``, ``BATCHMARK_BATCH_PASSWORD`` and ``BATCHMARK_QUALITY_PASSWORD``; they are sent
to the server already SCRAM-hashed, never in plain text, and never end up in a returned URL. Without them
no password is set, and the server's pg_hba.conf must then be what keeps other users out.

Every role and schema name is a quoted identifier (``psycopg2.sql.Identifier``); every value a parameter.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from batchmark import storage

STREAM = "batchmark_stream"
BATCH = "batchmark_batch"
QUALITY = "batchmark_quality"

PASSWORD_ENV = {
    STREAM: "BATCHMARK_STREAM_PASSWORD",
    BATCH: "BATCHMARK_BATCH_PASSWORD",
    QUALITY: "BATCHMARK_QUALITY_PASSWORD",
}

SCHEMAS = ("stream", "truth", "quality", "serving")
WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")
READ = ("SELECT",)

# role -> schemas it may use, (schema, table) -> privileges, sequences it may draw from.
USAGE: dict[str, tuple[str, ...]] = {
    STREAM: ("stream",),
    BATCH: ("stream", "truth", "quality"),
    QUALITY: ("stream", "truth", "quality", "serving"),
}
TABLES: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {
    STREAM: {
        ("stream", "results"): WRITE,
        ("stream", "late_events"): WRITE,
        ("stream", "checkpoints"): WRITE,
        ("stream", "open_windows"): WRITE,
        ("stream", "rejections"): WRITE,
        ("stream", "redriven"): WRITE,
    },
    BATCH: {
        ("stream", "results"): READ,
        ("truth", "results"): WRITE,
        ("truth", "staging"): WRITE,
        ("truth", "recomputed"): WRITE,
        ("quality", "window_accuracy"): WRITE,
        ("quality", "rejections"): WRITE,
    },
    QUALITY: {
        ("stream", "results"): READ,
        ("truth", "results"): READ,
        ("quality", "window_accuracy"): READ,
        ("quality", "comparison"): READ,
        ("quality", "metrics"): WRITE,
        ("quality", "accuracy_history"): WRITE,
        ("quality", "task_failures"): WRITE,
        ("quality", "rejections"): READ,
        ("quality", "alerts"): WRITE,
        ("quality", "alert_deliveries"): WRITE,
        ("quality", "alert_status"): READ,
        ("stream", "open_windows"): READ,
        ("stream", "rejections"): READ,
        ("truth", "recomputed"): READ,
        ("quality", "rejected_records"): READ,
        ("serving", "results"): READ,
        # the Kappa comparison (batchmark.kappa) runs where validation runs; its scratch databases need an owner
        ("stream", "version_results"): WRITE,
        ("quality", "version_runs"): WRITE,
        ("quality", "version_windows"): WRITE,
        ("quality", "version_comparison"): WRITE,
    },
}
SEQUENCES: dict[str, tuple[tuple[str, str], ...]] = {
    STREAM: (),
    BATCH: (),
    QUALITY: (
        ("quality", "accuracy_history_id_seq"),
        ("quality", "task_failures_id_seq"),
        ("quality", "alerts_id_seq"),
    ),
}
# Objects created later by the owner (init_schema drops and re-creates the view quality.comparison on every
# run, a new version may add a table): who gets what on them automatically, per schema.
DEFAULTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    STREAM: (("stream", WRITE),),
    BATCH: (("truth", WRITE),),
    QUALITY: (("quality", READ), ("serving", READ)),  # serving.results is re-created like quality.comparison
}

ROLES = (STREAM, BATCH, QUALITY)


def role_url(base_url: str, role: str, password_env: str | None = None) -> str:
    """base_url with role as its user; with the password from the environment variable password_env only
    when it is given and set (for a process building its own DATABASE_URL). Host, port, database kept."""
    parts = urlsplit(base_url)
    user = quote(role, safe="")
    password = os.environ.get(password_env, "") if password_env else ""
    if password:
        user += ":" + quote(password, safe="")
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _privileges(privs: tuple[str, ...]) -> sql.Composable:
    # Privilege keywords come from the constants above, never from input.
    assert all(p in WRITE for p in privs), privs
    return sql.SQL(", ").join(sql.SQL(p) for p in privs)


def _ensure_role(cur: psycopg2.extensions.cursor, role: str) -> None:
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    if cur.fetchone() is None:
        try:
            cur.execute("SAVEPOINT create_role")
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            cur.execute("RELEASE SAVEPOINT create_role")
        except psycopg2.errors.DuplicateObject:  # created meanwhile by another run
            cur.execute("ROLLBACK TO SAVEPOINT create_role")
    cur.execute(
        sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS").format(
            sql.Identifier(role)
        )
    )
    password = os.environ.get(PASSWORD_ENV[role], "")
    if password:
        # Hashed here (SCRAM with the server's password_encryption), so the plain text reaches no server log.
        hashed = psycopg2.extensions.encrypt_password(password, role, cur.connection)
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(role)), (hashed,))


def _grant(cur: psycopg2.extensions.cursor, role: str, database: str) -> None:
    r = sql.Identifier(role)
    cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), r))
    # Start from nothing, so a re-run also takes back what an older matrix granted.
    for schema in SCHEMAS:
        s = sql.Identifier(schema)
        cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, r))
        cur.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(s, r))
        cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(s, r))
        cur.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} REVOKE ALL ON TABLES FROM {}").format(s, r))
    for schema in USAGE[role]:
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), r))
    for (schema, table), privs in TABLES[role].items():
        cur.execute(sql.SQL("GRANT {} ON TABLE {} TO {}").format(_privileges(privs), sql.Identifier(schema, table), r))
    for schema, seq in SEQUENCES[role]:
        cur.execute(sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(sql.Identifier(schema, seq), r))
    for schema, privs in DEFAULTS[role]:
        cur.execute(
            sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT {} ON TABLES TO {}").format(
                sql.Identifier(schema), _privileges(privs), r
            )
        )


def create_roles(admin_url: str) -> dict[str, str]:
    """Create (or bring up to date) the three roles and their grants on the database of admin_url.

    admin_url: a role that owns the schema and may create roles (the one that ran ``batchmark init-db``).
    Idempotent. Returns {role: URL of the same database with that role as user, without a password}.
    """
    storage.ensure_database(admin_url)  # the database and every table exist before anything is granted
    database = storage.db_name(admin_url)
    with storage.transaction(admin_url) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(4243)")  # two runs at once would race on CREATE ROLE
        for role in ROLES:
            _ensure_role(cur, role)
            _grant(cur, role, database)
    return {role: role_url(admin_url, role) for role in ROLES}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from batchmark import config

    parser = argparse.ArgumentParser(
        prog="python -m batchmark.access",
        description="Create the least-privilege Postgres roles of the stream, batch and quality writers.",
    )
    parser.add_argument("--admin-url", default=None, help="owner's connection URL (default: DATABASE_URL)")
    args = parser.parse_args(argv)
    urls = create_roles(args.admin_url or config.load().database_url)
    for role, url in urls.items():
        state = "password set" if os.environ.get(PASSWORD_ENV[role]) else f"no password ({PASSWORD_ENV[role]} unset)"
        print(f"{role}\t{url}\t{state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
