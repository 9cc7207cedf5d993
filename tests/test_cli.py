"""The CLI refuses bad input with a message that says what to fix, and names unreachable services."""

from __future__ import annotations

import pytest

from batchmark import cli
from batchmark.broker import free_port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("bad", ["2026-13-01", "yesterday", "2026-11-24'; DROP TABLE x; --", ""])
def test_malformed_date_is_refused(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    code, out = run(capsys, "validate", "--date", bad)
    assert code == 2
    assert "YYYY-MM-DD" in out


def test_unknown_metric_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "validate", "--date", "2026-11-24", "--metric", "jobs; DROP TABLE truth.results")
    assert code == 2
    assert "unknown metric" in out and "jobs, cpu_seconds" in out


def test_bad_generator_share_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "generate", "--date", "2026-11-24", "--out", "/tmp/x.jsonl", "--late", "2")
    assert code == 2 and "between 0 and 0.5" in out


def test_unreachable_broker_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # noqa: ANN001
    port = free_port()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n')
    code, out = run(capsys, "replay", str(data))
    assert code == 2
    assert f"no Kafka broker at 127.0.0.1:{port}" in out and "KAFKA_BOOTSTRAP_SERVERS" in out


def test_unreachable_postgres_is_named(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/nope")
    code, out = run(capsys, "init-db")
    assert code == 2
    assert "cannot reach PostgreSQL" in out and "DATABASE_URL" in out


def test_replay_of_an_unknown_format_is_refused(capsys: pytest.CaptureFixture[str], broker, tmp_path) -> None:  # noqa: ANN001
    data = tmp_path / "d.xml"
    data.write_text("<a/>")
    code, out = run(capsys, "replay", str(data))
    assert code == 2 and ".jsonl, .csv or .parquet" in out


def test_batchmark_airflow_runs_the_airflow_cli_with_this_homes_settings(tmp_path) -> None:  # noqa: ANN001
    """`batchmark airflow ...` reaches the same metadata DB, DAGs folder and API address as `batchmark up`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from batchmark.config import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["BATCHMARK_HOME"] = str(tmp_path)
    (tmp_path / "stack.json").write_text('{"pid": -1, "api_url": "http://127.0.0.1:18123"}')
    batchmark = str(Path(sys.executable).parent / "batchmark")

    def value(section: str, key: str) -> str:
        out = subprocess.run(
            [batchmark, "airflow", "config", "get-value", section, key], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    assert value("core", "dags_folder") == str(REPO_ROOT / "dags")
    # the stack's metadata DB is Postgres, beside the product's database (SQLite locks out concurrent writers)
    from batchmark import config

    product = config.load().database_url if "DATABASE_URL" in env else None
    conn = value("database", "sql_alchemy_conn")
    assert conn.startswith("postgresql+psycopg2://") and conn.endswith("_airflow"), conn
    if product:
        assert conn.rsplit("/", 1)[1] == product.rsplit("/", 1)[1] + "_airflow"
    assert value("core", "execution_api_server_url") == "http://127.0.0.1:18123/execution/"
