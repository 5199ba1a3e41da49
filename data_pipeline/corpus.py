"""Reading raw corpora: `.jsonl`/`.json` (text under a key) or `.txt`, one document per line, optionally `.gz`.
A bad line raises `DatasetError` as `FILE:LINE` (or is counted and skipped when asked); a file that cannot be read
to its end always raises.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from data_pipeline.errors import DatasetError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")


@dataclass
class ReadStats:
    """Counts of what was read (shared across files)."""
    lines: int = 0
    bad_lines: int = 0
    bytes: int = 0
    first_bad: list = field(default_factory=list)  # up to 5 "file:line: reason" strings


def check_inputs(paths: list[str]) -> list[str]:
    """Every input is a readable file with a supported suffix, each given once (`./a` and `a`, or two links to
    one file, are the same input: its documents would be counted twice); returns the list unchanged."""
    if not paths:
        raise DatasetError("--input: no input files given; pass one or more .jsonl/.json/.txt files")
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        if os.path.isdir(p):
            raise DatasetError(f"--input {p}: is a directory; pass the files in it (e.g. {os.path.join(p, '*.jsonl')})")
        if not os.path.isfile(p):
            raise DatasetError(f"--input {p}: file not found")
        if not p.endswith(JSON_SUFFIXES + TEXT_SUFFIXES):
            raise DatasetError(f"--input {p}: unsupported file type; use .jsonl/.json (one JSON object per "
                               f"line) or .txt (one document per line), optionally .gz")
        if not os.access(p, os.R_OK):
            raise DatasetError(f"--input {p}: not readable (permission denied); fix its permissions")
        st = os.stat(p)
        if (st.st_dev, st.st_ino) in seen:
            raise DatasetError(f"--input {p}: the same file as {seen[st.st_dev, st.st_ino]}, given twice (its "
                               f"documents would be duplicated); give each input once")
        seen[st.st_dev, st.st_ino] = p
    return paths


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _parse(path: str, lineno: int, raw: bytes, json_key: str | None) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: undecodable bytes at column {e.start + 1} ({e.reason}); the "
                           f"input must be UTF-8 (fix the line or pass --skip-bad-lines)") from None
    if lineno == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark is not text
        line = line[1:]
    if json_key is None:
        return line.rstrip("\r\n")
    if not line.strip():
        return ""
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.pos + 1}); fix the line or "
                           f"pass --skip-bad-lines") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; fix the line "
                           f"or pass --skip-bad-lines")
    if json_key not in obj:
        raise DatasetError(f"{path}:{lineno}: key {json_key!r} missing (keys: {sorted(obj)[:10]}); choose the "
                           f"key with --json-keys, or pass --skip-bad-lines")
    text = obj[json_key]
    if not isinstance(text, str):
        raise DatasetError(f"{path}:{lineno}: key {json_key!r} holds {type(text).__name__}, expected a string; "
                           f"fix the line or pass --skip-bad-lines")
    if b"\\ud" in raw or b"\\uD" in raw:  # only a \uD800-\uDFFF escape can put a lone surrogate in valid JSON
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DatasetError(f"{path}:{lineno}: key {json_key!r} holds a lone UTF-16 surrogate "
                               f"\\u{ord(text[e.start]):04x} at character {e.start + 1}, which is not Unicode text; "
                               f"fix the line or pass --skip-bad-lines") from None
    return text


def _read_error(path: str, lineno: int, e: BaseException) -> DatasetError:
    where = f"after line {lineno}" if lineno else "at its start"
    if isinstance(e, gzip.BadGzipFile):
        return DatasetError(f"{path}: not a gzip file ({e}); rename it without .gz if it is plain text, or "
                            f"check it with `gzip -t {path}`")
    if isinstance(e, (EOFError, zlib.error)):
        return DatasetError(f"{path}: truncated or corrupt gzip data {where} ({e}); the file is incomplete: "
                            f"download or compress it again (`gzip -t {path}` checks it)")
    return DatasetError(f"{path}: read failed {where} ({getattr(e, 'strerror', None) or e}); check the file and "
                        f"the disk")


def iter_documents(paths: list[str], json_key: str = "text", skip_bad_lines: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the text of every line (document) of every file, in order. Empty documents are yielded as ''."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        key = None if path.endswith(TEXT_SUFFIXES) else json_key
        lineno = 0
        try:
            with _open(path) as f:
                for lineno, raw in enumerate(f, 1):
                    stats.lines += 1
                    stats.bytes += len(raw)
                    try:
                        text = _parse(path, lineno, raw, key)
                    except DatasetError as e:
                        if not skip_bad_lines:
                            raise
                        stats.bad_lines += 1
                        if len(stats.first_bad) < 5:
                            stats.first_bad.append(str(e).split("; ")[0])
                        continue
                    yield text
        except (OSError, EOFError, zlib.error) as e:  # from opening or reading the file, never from a consumer
            raise _read_error(path, lineno, e) from None
