"""Headless Chromium for tests: Debian's chromium through Playwright, every request outside the allowed origins
blocked and recorded (a page must need nothing from the internet)."""

from __future__ import annotations

import os
from typing import Any

CHROMIUM = os.environ.get("BATCHMARK_CHROMIUM", "/usr/bin/chromium")


def block_outside(page: Any, allowed: tuple[str, ...], outside: list[str]) -> None:
    """Let requests to URLs starting with `allowed` through; abort and record every other one in `outside`."""

    def route(r: Any) -> None:
        if r.request.url.startswith(allowed):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
