"""Validation reports that work offline: the GX Data Docs site rewritten to load only vendored assets.

GX 1.24 writes its pages with scripts and styles from public CDNs (jQuery, Bootstrap, bootstrap-table, Font
Awesome, Vega) and a logo from a cloud bucket; offline, the index's list of validations stays empty. After each
validation :func:`make_offline` copies ``batchmark/static/vendor`` (byte-identical copies of those files, sources
in its SOURCES.md) into the site and points every page at them, by a relative path, so the site works from the
disk (file://) and served by the Airflow plugin alike. Pages are rewritten once: a stamp file marks the last pass.
:func:`annotate` adds batchmark's figures (max error, window counts, causes) to a metric's validation page.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

VENDOR = Path(__file__).parent / "static" / "vendor"
SITE_VENDOR = "static/batchmark-vendor"  # inside the Data Docs site
STAMP = ".batchmark-offline"

CDN = {  # what GX pages load -> the vendored file (same version)
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery-3.7.1.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/js/bootstrap.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/css/bootstrap.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper/popper-1.12.9.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker/js/bootstrap-datepicker.min.js"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker/css/bootstrap-datepicker.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega/vega-embed.min.js",
}
_RESOURCE = re.compile(r'\b(src|href)="(https?://[^"]+)"')
_DARK_THEME = re.compile(r"<link[^>]*bootstrap-prefers-dark\.css[^>]*>\s*")  # optional: the dark theme, dropped
_LOGO = re.compile(r'<img[^>]*src="https://great-expectations-web-assets\.[^"]*"[^>]*>')  # with a tracking id
_CSS_URL = re.compile(r"""url\(['"]?https?://[^)'"]+['"]?\)""")  # the dark theme's logo background
_SRI = re.compile(r'\s(integrity|crossorigin)="[^"]*"')  # local copies; crossorigin breaks file:// scripts


def rewrite(html: str, prefix: str) -> str:
    """One page with every CDN asset pointed at prefix + the vendored copy, the dark theme and the logo dropped."""
    html = _DARK_THEME.sub("", html)
    html = _LOGO.sub('<span class="h4 text-secondary">batchmark &middot; accuracy reports</span>', html)
    html = _CSS_URL.sub("none", html)
    html = _SRI.sub("", html)

    def local(m: re.Match[str]) -> str:
        target = CDN.get(m.group(2))
        return f'{m.group(1)}="{prefix}{SITE_VENDOR}/{target}"' if target else m.group(0)

    return _RESOURCE.sub(local, html)


def external_resources(html: str) -> list[str]:
    """The URLs a page would load from outside (scripts, styles, images; not the links a person may click)."""
    found = re.findall(r'<(?:script|img|iframe)[^>]*\ssrc="(https?://[^"]+)"', html)
    found += re.findall(r'<link[^>]*\shref="(https?://[^"]+)"', html)
    found += re.findall(r"""url\(['"]?(https?://[^)'"]+)""", html)
    return found


def make_offline(site: Path) -> int:
    """Copy the vendored assets into a Data Docs site and rewrite its pages written since the last pass;
    returns how many pages were rewritten."""
    if not site.is_dir():
        return 0
    target = site / SITE_VENDOR
    if (
        not (target / "SOURCES.md").is_file()
        or (target / "SOURCES.md").read_bytes() != (VENDOR / "SOURCES.md").read_bytes()
    ):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(VENDOR, target)
    stamp = site / STAMP
    since = stamp.stat().st_mtime if stamp.exists() else 0.0
    stamp.touch()  # before the pass: a page GX writes meanwhile is rewritten next time
    rewritten = 0
    for page in site.rglob("*.html"):
        if page.stat().st_mtime < since or SITE_VENDOR in page.parts:
            continue
        text = page.read_text(encoding="utf-8")
        prefix = "../" * (len(page.relative_to(site).parts) - 1)
        new = rewrite(text, prefix)
        if new != text:
            page.write_text(new, encoding="utf-8")
            rewritten += 1
    return rewritten


FIGURES_ID = "batchmark-figures"
_SECTION_1 = '<div id="section-1" '


def annotate(page: Path, fragment: str) -> bool:
    """Put batchmark's figures (an HTML fragment) at the top of a GX validation page, once; False when the
    page has no place for it (GX changed its layout) or already has them."""
    text = page.read_text(encoding="utf-8")
    if f'id="{FIGURES_ID}"' in text or _SECTION_1 not in text:
        return False
    block = f'<div id="{FIGURES_ID}" class="alert alert-info mx-3 mt-2">{fragment}</div>\n'
    page.write_text(text.replace(_SECTION_1, block + _SECTION_1, 1), encoding="utf-8")
    return True
