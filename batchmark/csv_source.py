"""A CSV file as the dataset's records, following the definitions' ``[dataset.csv]`` table.

The mapping runs once, where records enter the product (the replayer), so the stream and the batch see the same
records. What it does, in order, for each row:
- headers are renamed (``rename``), and only the columns the dataset declares are read; the rest are ignored;
- a cell equal to one of ``null_values`` (default: empty, NA, N/A, NaN, null, NULL) is null; other cells are
  typed by the field's declared type (an unparseable cell stays text, so validation rejects it with its reason);
- the event id is the id column, or, with ``id_from``, derived from those columns: ``"h"`` + the first 24 hex
  digits of BLAKE2b over the cells joined by U+001F. Rows with equal id cells get the same id, so identical
  rows are duplicates (counted once by the batch, as any duplicate); two rows with equal id cells that differ
  elsewhere are a collision, refused before anything is sent, naming both rows;
- the event time is the time column, or, with ``time_from``, the cells of those columns joined by a space and
  parsed with ``time_format`` (strptime; default ISO-8601); a time without a zone is read in ``time_zone``
  (an IANA name; default: the dataset's ``timezone``). Local times that happen twice (the autumn DST change)
  take the first; local times that do not exist (the spring change) are read with the offset before the change
  (Python's fold=0). The record carries epoch milliseconds, so nothing downstream depends on the zone.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from batchmark.errors import ConfigError

DEFAULT_NULLS = ("", "NA", "N/A", "NaN", "null", "NULL")


@dataclass(frozen=True)
class CsvSpec:
    """The ``[dataset.csv]`` table, checked."""

    rename: tuple[tuple[str, str], ...] = ()  # (file header, field name)
    null_values: frozenset[str] = frozenset(DEFAULT_NULLS)
    id_from: tuple[str, ...] = ()
    time_from: tuple[str, ...] = ()
    time_format: str | None = None
    time_zone: str | None = None
    delimiter: str = ","

    @staticmethod
    def from_table(raw: dict[str, Any]) -> CsvSpec:
        """The checked table -> CsvSpec; an unknown time zone is refused."""
        zone = raw.get("time_zone")
        if zone is not None:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(
                    f"[dataset.csv] time_zone {zone!r} is not an IANA time zone name, e.g. 'America/New_York'"
                ) from None
        return CsvSpec(
            rename=tuple((raw.get("rename") or {}).items()),
            null_values=frozenset(raw.get("null_values", DEFAULT_NULLS)),
            id_from=tuple(raw.get("id_from") or ()),
            time_from=tuple(raw.get("time_from") or ()),
            time_format=raw.get("time_format"),
            time_zone=zone,
            delimiter=raw.get("delimiter", ","),
        )


def derived_id(cells: list[str]) -> str:
    """The event id of a row whose file has none: a hash of its id cells (see the module's docstring)."""
    return "h" + hashlib.blake2b("\x1f".join(cells).encode(), digest_size=12).hexdigest()


def parse_local_time(text: str, time_format: str | None, zone: str | None) -> int | str:
    """Joined time cells -> epoch milliseconds; the text itself when it does not parse (validation says why)."""
    try:
        dt = datetime.strptime(text, time_format) if time_format else datetime.fromisoformat(text)
    except ValueError:
        return text
    if dt.tzinfo is None:
        if zone is None:
            return text  # no zone anywhere: validation rejects it as a time without a zone
        dt = dt.replace(tzinfo=ZoneInfo(zone))
    return int(dt.timestamp() * 1000)


def _typed(cell: str, ftype: str) -> object:
    """A CSV cell as the field's type; unparseable cells stay text, so validation rejects them."""
    if ftype == "string":
        return cell
    try:
        return float(cell) if ftype == "float" else int(cell)
    except ValueError:
        if ftype == "int":
            try:
                value = float(cell)
                return int(value) if value.is_integer() else cell
            except ValueError:
                return cell
        return cell


class CsvMapping:
    """One CSV file read through a dataset's [dataset.csv] table."""

    def __init__(self, path: Path, ds: Any) -> None:
        self.path, self.ds, self.spec = path, ds, ds.csv
        self.zone = self.spec.time_zone or ds.timezone  # the zone of times written without one
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh, delimiter=self.spec.delimiter), None)
        if not header:
            raise ConfigError(f"{path} is empty: a CSV needs a header row")
        renamed = dict(self.spec.rename)
        names = [renamed.get(h, h) for h in header]
        at = {name: i for i, name in enumerate(names)}
        wanted = [f.name for f in ds.fields]
        wanted += [] if self.spec.id_from else [ds.event_id]
        wanted += [] if self.spec.time_from else [ds.event_time]
        wanted += [*self.spec.id_from, *self.spec.time_from]
        missing = [w for w in dict.fromkeys(wanted) if w not in at]
        if missing:
            raise ConfigError(
                f"{path.name} has no column {', '.join(map(repr, missing))} (after [dataset.csv] rename); "
                f"its columns: {', '.join(names)}"
            )
        self.fields = [(f.name, at[f.name], f.type) for f in ds.fields]
        self.id_cols = [at[c] for c in self.spec.id_from] or None
        self.id_col = None if self.spec.id_from else at[ds.event_id]
        self.time_cols = [at[c] for c in self.spec.time_from] or None
        self.time_col = None if self.spec.time_from else at[ds.event_time]

    def _rows(self) -> Iterator[tuple[int, list[str]]]:
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=self.spec.delimiter)
            next(reader, None)
            for line, row in enumerate(reader, start=2):
                if row:
                    yield line, row

    def check_ids(self) -> int:
        """Refuse id collisions (equal id cells, records that differ) before anything is sent; the number of rows.
        Rows are compared as the records they become: columns no field reads, or two spellings of null, do not
        make two rows different."""
        if self.id_cols is None:
            return sum(1 for _ in self._rows())
        seen: dict[bytes, tuple[bytes, int]] = {}
        n = 0
        for line, row in self._rows():
            n += 1
            record = self._record(row)
            key = hashlib.blake2b("\x1f".join(self._cell(row, i) for i in self.id_cols).encode(), digest_size=12)
            whole = hashlib.blake2b(record, digest_size=12).digest()
            first = seen.setdefault(key.digest(), (whole, line))
            if first[0] != whole:
                raise ConfigError(
                    f"{self.path.name}: rows at lines {first[1]} and {line} have the same id_from cells "
                    f"({', '.join(self.spec.id_from)}) but differ elsewhere, so they would get one event id: add "
                    "columns to id_from until each row is unique (identical rows are duplicates and count once)"
                )
        return n

    @staticmethod
    def _cell(row: list[str], i: int) -> str:
        return row[i] if i < len(row) else ""

    def records(self) -> Iterator[bytes]:
        """Each row as the JSON record the worker validates."""
        for _, row in self._rows():
            yield self._record(row)

    def _record(self, row: list[str]) -> bytes:
        """One row as a JSON record: id, time and the declared fields, nulls as null."""
        nulls, spec, ds = self.spec.null_values, self.spec, self.ds
        cell = self._cell
        rec: dict[str, object] = {}
        if self.id_cols is not None:
            rec[ds.event_id] = derived_id([cell(row, i) for i in self.id_cols])
        else:
            raw_id = cell(row, self.id_col)
            rec[ds.event_id] = None if raw_id in nulls else raw_id
        if self.time_cols is not None:
            text = " ".join(cell(row, i) for i in self.time_cols)
            rec[ds.event_time] = None if text.strip() in nulls else parse_local_time(text, spec.time_format, self.zone)
        else:
            text = cell(row, self.time_col)
            rec[ds.event_time] = None if text in nulls else _time_cell(text, spec.time_format, self.zone)
        for name, i, ftype in self.fields:
            c = cell(row, i)
            rec[name] = None if c in nulls else _typed(c, ftype)
        return orjson.dumps(rec)


def _time_cell(text: str, time_format: str | None, zone: str | None) -> object:
    """One time column: epoch ms stay numbers; a text time is parsed in the mapping's zone when it has none."""
    if text.lstrip("-").isdigit():
        return int(text)
    if time_format or zone:
        return parse_local_time(text, time_format, zone)
    return text
