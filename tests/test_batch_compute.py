"""The batch's archive reader: byte ranges read in parallel give back every line exactly once, as raw bytes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from batchmark.batch_compute import line_ranges, read_line_range


def _lines_of(path: Path, chunk: int) -> list[bytes]:
    ranges = line_ranges(path, chunk)
    assert ranges[0][1] == 0 and ranges[-1][2] == path.stat().st_size
    assert all(a[2] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, no gap or overlap
    return [line for p, s, e in ranges for line in read_line_range(p, s, e)]


@pytest.mark.parametrize("seed", range(6))
def test_every_line_once_whatever_the_chunk_size(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(400):
        n = rng.choice([0, 1, 2, 5, 40, 300, 5000])  # empty lines, tiny ones and lines longer than a chunk
        body = bytes(rng.randrange(32, 127) for _ in range(n)) if n else b""
        if i % 37 == 0:
            body += b"\xff\xfe not utf-8"  # must come back byte for byte
        lines.append(body)
    ends = [rng.choice([b"\n", b"\r\n"]) for _ in lines]
    data = b"".join(line + end for line, end in zip(lines, ends, strict=True))
    if seed % 2:  # no newline after the last line
        data = data.rstrip(b"\r\n")
    path = tmp_path / "archive.jsonl"
    path.write_bytes(data)
    expected = [line for line in lines if line]
    for chunk in (97, 1000, 4999, 5001, 65_536, len(data) - 1, len(data), 10 * len(data)):
        assert _lines_of(path, chunk) == expected, chunk


def test_one_byte_chunks(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 22}\r\n\xff\n{"c": 333}')
    assert _lines_of(path, 1) == [b'{"a": 1}', b'{"b": 22}', b"\xff", b'{"c": 333}']
    assert _lines_of(path, 2) == _lines_of(path, 1)


def test_an_empty_archive_has_no_lines(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert _lines_of(path, 10) == []
