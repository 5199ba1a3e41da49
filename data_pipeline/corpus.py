"""Reading raw corpora, one document per line or row: `.jsonl`/`.json` (text under a key) or `.txt`, optionally
`.gz` or `.zst`; `.parquet`/`.arrow` files and `datasets` directories (a text column, see `arrow_corpus`); a
directory or glob of these. A bad line or row raises `DatasetError` as `FILE:LINE` (or is counted and skipped when
asked); a file that cannot be read to its end always raises. Every format yields the same documents for the same
texts, so the output is the `.jsonl` path's byte for byte. Reference: docs/data-formats.md.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from data_pipeline import arrow_corpus
from data_pipeline.errors import DatasetError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
ARROW_SUFFIXES = (".parquet", ".arrow")
SUPPORTED = (".jsonl/.json (one JSON object per line) or .txt (one document per line), each optionally .gz or "
             ".zst; .parquet or .arrow files; a `datasets` save_to_disk directory; or a directory or glob of these")


@dataclass
class ReadStats:
    """Counts of what was read (shared across files)."""
    lines: int = 0
    bad_lines: int = 0
    bytes: int = 0
    first_bad: list = field(default_factory=list)  # up to 5 "file:line: reason" strings


def check_inputs(paths: list[str]) -> list[str]:
    """The inputs as a list of sources (files and `datasets` directories), directories and globs expanded in
    sorted order. Every source is readable, has a supported type whose reader is installed, and is given once
    (`./a` and `a`, or two links to one file, are the same input: its documents would be counted twice)."""
    if not paths:
        raise DatasetError(f"--input: no input files given; pass one or more of: {SUPPORTED}")
    sources = [source for p in paths for source in _expand(p)]
    seen: dict[tuple[int, int], str] = {}
    for p in sources:
        if not p.endswith(JSON_SUFFIXES + TEXT_SUFFIXES + ARROW_SUFFIXES) and not arrow_corpus.is_datasets_dir(p):
            raise DatasetError(f"--input {p}: unsupported file type; use {SUPPORTED}")
        _require_reader(p)
        if not os.access(p, os.R_OK):
            raise DatasetError(f"--input {p}: not readable (permission denied); fix its permissions")
        st = os.stat(p)
        if (st.st_dev, st.st_ino) in seen:
            raise DatasetError(f"--input {p}: the same file as {seen[st.st_dev, st.st_ino]}, given twice (its "
                               f"documents would be duplicated); give each input once")
        seen[st.st_dev, st.st_ino] = p
    return sources


def _expand(path: str) -> list[str]:
    """One --input as sources: a file or `datasets` directory as itself, a directory as the supported files and
    `datasets` directories below it, a glob (`data/*.parquet`, `data/**/*.jsonl.zst`) as its matches."""
    if not os.path.exists(path) and glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise DatasetError(f"--input {path}: no file matches this pattern")
        return [source for m in matches for source in _expand(m)]
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise DatasetError(f"--input {path}: file not found")
        return [path]
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(e.name for e in os.scandir(path) if arrow_corpus.is_datasets_dir(e.path))
        raise DatasetError(f"--input {path}: a `datasets` DatasetDict with splits {splits}; pass one split, e.g. "
                           f"{os.path.join(path, splits[0] if splits else 'train')}")
    if arrow_corpus.is_datasets_dir(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if arrow_corpus.is_datasets_dir(root):
            found.append(root)
            dirs.clear()
            continue
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(JSON_SUFFIXES + TEXT_SUFFIXES +
                                                                               ARROW_SUFFIXES)]
    if not found:
        raise DatasetError(f"--input {path}: a directory with no input in it; it should hold {SUPPORTED}")
    return sorted(found, key=lambda p: os.path.relpath(p, path).split(os.sep))


def _require_reader(path: str) -> None:
    if path.endswith(".zst"):
        arrow_corpus.require("zstandard", ".zst files", path)
    elif path.endswith(ARROW_SUFFIXES) or os.path.isdir(path):
        arrow_corpus.require("pyarrow", "Parquet/Arrow data", path)


def is_compressed_or_columnar(path: str) -> bool:
    """Whether the bytes read from `path` differ from its size on disk (so a progress total is unknown)."""
    return not path.endswith((".jsonl", ".json", ".txt"))


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a `.zst` file (one or more frames), read in chunks. Raises EOFError when the
    file ends inside a frame (zstandard's own readers return the partial data silently)."""

    def __init__(self, path: str):
        import zstandard
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = memoryview(b"")
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(1 << 18)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._started = True
            out = [self._obj.decompress(chunk)]
            while self._obj.eof and self._obj.unused_data:  # a further frame follows in this chunk
                rest = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                out.append(self._obj.decompress(rest))
            self._pending = memoryview(b"".join(out))
            if self._obj.eof:
                self._obj = self._dctx.decompressobj()
                self._started = False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]  # a memoryview: no copy
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


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
    if path.endswith(".zst"):
        if "Unknown frame descriptor" in str(e) and not lineno:
            return DatasetError(f"{path}: not a zstd file ({e}); rename it without .zst if it is plain text, or "
                                f"check it with `zstd -t {path}`")
        return DatasetError(f"{path}: truncated or corrupt zstd data {where} ({e}); the file is incomplete: "
                            f"download or compress it again (`zstd -t {path}` checks it)")
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
    """Yield the text of every line or row (document) of every source, in order. Empty documents are yielded as
    ''. `paths` are sources as `check_inputs` returns them."""
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        for item in _items(path, json_key, stats):
            stats.lines += 1
            if isinstance(item, DatasetError):
                if not skip_bad_lines:
                    raise item
                stats.bad_lines += 1
                if len(stats.first_bad) < 5:
                    stats.first_bad.append(str(item).split("; ")[0])
                continue
            yield item


def _items(path: str, json_key: str, stats: ReadStats) -> Iterator[str | DatasetError]:
    """A source's documents, a DatasetError in place of each bad line or row."""
    if os.path.isdir(path):
        for shard in arrow_corpus.datasets_shards(path):
            for _, text in arrow_corpus.iter_rows(shard, json_key, stats):
                yield text
    elif path.endswith(ARROW_SUFFIXES):
        for _, text in arrow_corpus.iter_rows(path, json_key, stats):
            yield text
    else:
        yield from _lines(path, None if path.endswith(TEXT_SUFFIXES) else json_key, stats)


def _lines(path: str, key: str | None, stats: ReadStats) -> Iterator[str | DatasetError]:
    read_errors: tuple = (OSError, EOFError, zlib.error)
    if path.endswith(".zst"):
        read_errors += (arrow_corpus.require("zstandard", ".zst files", path).ZstdError,)
    lineno = 0
    try:
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                stats.bytes += len(raw)
                try:
                    text = _parse(path, lineno, raw, key)
                except DatasetError as e:
                    text = e
                yield text
    except read_errors as e:  # from opening or reading the file, never from a consumer
        raise _read_error(path, lineno, e) from None
