"""Megatron MMIDIDX v1 datasets, `PREFIX.bin` (tokens) + `PREFIX.idx` (index), byte-compatible with megatron-core's
`IndexedDataset` both ways. `IndexedDataset` memory-maps and checks a dataset on open; `IndexedDatasetBuilder`
writes one under temporary names. The layout: docs/data-pipeline.md.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable

import numpy as np

from data_pipeline.errors import DatasetError
from data_pipeline.atomic import fsync_file, remove_quietly, remove_stale_temps, tmp_name
from data_pipeline.files import check_output_prefix, make_parent_dir, os_error, renaming
from data_pipeline.provenance import TokenizerIdentity, sidecar_bytes, sidecar_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document-index count
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_REBUILD = "re-create it with `python -m data_pipeline.preprocess` (or restore it from the original copy)"


def bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def optimal_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with margin (Megatron's rule: vocabulary < 65,500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def check_prefix(prefix: str) -> None:
    """Both files of PREFIX exist as files, or a DatasetError saying which is missing and how to make it."""
    for path in (idx_path(prefix), bin_path(prefix)):
        if os.path.isdir(path):
            raise DatasetError(f"{path}: is a directory, not the dataset's file; pass the prefix of a "
                               f"PREFIX.bin/PREFIX.idx pair")
        if not os.path.isfile(path):
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" (pass the prefix without the extension: {prefix[:-4]!r})"
            elif os.path.isdir(prefix):
                found = sorted(f[:-4] for f in os.listdir(prefix) if f.endswith(".idx"))[:5]
                hint = (f" ({prefix} is a directory; pass the prefix of a dataset in it"
                        f"{': ' + ', '.join(os.path.join(prefix, f) for f in found) if found else ''})")
            raise DatasetError(f"{path}: file not found{hint}; create the dataset with "
                               f"`python -m data_pipeline.preprocess --output-prefix {prefix} ...`")


def read_header(path: str) -> tuple[np.dtype, int, int, int]:
    """Parse and check the fixed 34-byte header: (dtype, sequence count, document-index count, file size)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise os_error(path, e, "read") from None
    if not head.startswith(MAGIC) and not (len(head) < len(MAGIC) and MAGIC.startswith(head)):
        raise DatasetError(f"{path}: bad magic {head[:9]!r}, expected {MAGIC!r}: not a Megatron MMIDIDX "
                           f"index file; {_REBUILD}")
    if len(head) < HEADER_SIZE:
        raise DatasetError(f"{path}: truncated header ({size} bytes, need {HEADER_SIZE}); {_REBUILD}")
    version, code, n_seq, n_doc_idx = struct.unpack("<QBQQ", head[9:])
    if version != VERSION:
        raise DatasetError(f"{path}: unsupported index version {version}, expected {VERSION}; {_REBUILD}")
    if code not in DTYPE_CODES:
        raise DatasetError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)} "
                           f"({', '.join(f'{k}={np.dtype(v).name}' for k, v in DTYPE_CODES.items())}); {_REBUILD}")
    return np.dtype(DTYPE_CODES[code]), n_seq, n_doc_idx, size


def _memmap(path: str, dtype) -> np.memmap:
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as e:
        raise os_error(path, e, "read") from None


class IndexedDataset:
    """Memory-mapped read access to `PREFIX.bin`/`PREFIX.idx`.

    Opening checks the header and every structural invariant (sizes vs pointers vs `.bin` length, document
    index monotone from 0 to the sequence count) with vectorised numpy, so a damaged file raises
    `DatasetError` naming the file instead of returning garbage.

    `ds[i]` is sequence i (a read-only view), `ds.document(d)` the tokens of document d (its sequences are
    contiguous), `ds.get(i, offset, length)` a partial read, `ds.tokens` the whole `.bin` as one array.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        check_prefix(self.prefix)
        self.idx_path, self.bin_path = idx_path(self.prefix), bin_path(self.prefix)
        self.dtype, n_seq, n_doc_idx, size = read_header(self.idx_path)
        body = 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        if size not in (HEADER_SIZE + body, HEADER_SIZE + body + n_seq):
            state = "truncated" if size < HEADER_SIZE + body else "has trailing bytes"
            raise DatasetError(f"{self.idx_path}: {state}: {size} bytes, but its header ({n_seq} sequences, "
                               f"{n_doc_idx} document-index entries) needs {HEADER_SIZE + body}; {_REBUILD}")
        if n_doc_idx < 1:
            raise DatasetError(f"{self.idx_path}: document index is empty (it must start with 0 and end at "
                               f"the sequence count {n_seq}); {_REBUILD}")
        self._idx_map = _memmap(self.idx_path, np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_map, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(self._idx_map, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(self._idx_map, np.int64, n_doc_idx, off + 12 * n_seq)
        self._check_index()
        try:
            bin_size = os.path.getsize(self.bin_path)
        except OSError as e:
            raise os_error(self.bin_path, e, "read") from None
        expected = self.num_tokens * self.dtype.itemsize
        if bin_size != expected:
            state = "truncated" if bin_size < expected else "longer than its index says"
            raise DatasetError(f"{self.bin_path}: {state}: {bin_size} bytes, but {self.idx_path} describes "
                               f"{self.num_tokens} tokens of {self.dtype.name} = {expected} bytes; {_REBUILD}")
        if bin_size == 0:  # np.memmap refuses empty files
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = _memmap(self.bin_path, self.dtype)

    def _check_index(self) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        where = f"{self.idx_path}"
        if len(lengths) and lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise DatasetError(f"{where}: sequence {i} has negative length {int(lengths[i])}; {_REBUILD}")
        expected = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= self.dtype.itemsize
        bad = np.flatnonzero(pointers != expected)
        if len(bad):
            i = int(bad[0])
            raise DatasetError(f"{where}: sequence {i} points at byte {int(pointers[i])}, but the lengths before "
                               f"it put it at byte {int(expected[i])} (sequences must be contiguous); {_REBUILD}")
        if docs[0] != 0 or docs[-1] != len(lengths):
            raise DatasetError(f"{where}: document index must run from 0 to the sequence count {len(lengths)}, "
                               f"got {int(docs[0])} .. {int(docs[-1])}; {_REBUILD}")
        step = np.diff(docs)
        if len(step) and step.min() < 0:
            d = int(np.argmax(step < 0))
            raise DatasetError(f"{where}: document index decreases at document {d} ({int(docs[d])} -> "
                               f"{int(docs[d + 1])}); it must be non-decreasing; {_REBUILD}")
        self.num_tokens = int(lengths.sum(dtype=np.int64))

    # --- sequences -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        start = self.sequence_pointers[i] // self.dtype.itemsize
        return self.tokens[start:start + self.sequence_lengths[i]]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        seq = self[i]
        return seq[offset:] if length is None else seq[offset:offset + length]

    # --- documents -------------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_token_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of every document in tokens of `.tokens` (int64 arrays of num_documents)."""
        seq_starts = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=seq_starts[1:])
        bounds = seq_starts[self.document_indices]
        return bounds[:-1], np.diff(bounds)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences are contiguous in `.bin`)."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"document {d} out of range for {self.prefix} ({self.num_documents} documents)")
        first, last = self.document_indices[d], self.document_indices[d + 1]
        if first == last:
            return self.tokens[0:0]
        start = self.sequence_pointers[first] // self.dtype.itemsize
        end = self.sequence_pointers[last - 1] // self.dtype.itemsize + self.sequence_lengths[last - 1]
        return self.tokens[start:end]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, {len(self)} sequences, "
                f"{self.num_tokens} tokens, {self.dtype.name})")


class IndexedDatasetBuilder:
    """Writes `PREFIX.bin`/`PREFIX.idx` under temporary names; `finalize()` renames both into place.

    An interrupted build (exception, Ctrl-C, SIGTERM in a CLI) leaves no new `PREFIX.bin`/`PREFIX.idx` and the
    old ones, if any, unchanged: use it as a context manager, or call `abort()`, to delete the temporary files.
    Temporary files of a killed build (`PREFIX.bin.tmp-PID` of a dead PID) are removed when the next one starts.
    OS errors (read-only place, full disk, a file where a directory should be) raise `DatasetError` naming the file.
    With `identity` (the tokenizer that made the ids) `PREFIX.tokenizer.json` is written and renamed with them
    (data_pipeline.provenance); without, an old one is removed, so a sidecar never describes data it did not see.
    """

    def __init__(self, prefix: str, dtype=np.uint16, identity: TokenizerIdentity | None = None):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self.identity = identity
        if self.dtype not in CODE_OF_DTYPE:
            raise DatasetError(f"dtype {self.dtype.name} has no MMIDIDX code; use one of "
                               f"{[np.dtype(v).name for v in DTYPE_CODES.values()]}")
        check_output_prefix(self.prefix, (".bin", ".idx"))
        make_parent_dir(bin_path(self.prefix))
        for path in _outputs(self.prefix):
            remove_stale_temps(path)
        self._tmp_bin, self._tmp_idx = tmp_name(bin_path(self.prefix)), tmp_name(idx_path(self.prefix))
        self._tmp_sidecar = tmp_name(sidecar_path(self.prefix))
        try:
            self._bin = open(self._tmp_bin, "wb")
        except OSError as e:
            raise os_error(self._tmp_bin, e) from None
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = []  # sequence count at the end of each document
        self._num_sequences = 0
        self._pending_sequences = 0  # sequences added with add_item since the last end_document
        self.finalized = False

    def _write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            if tokens.size and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                lo, hi = tokens.min(), tokens.max()
                if lo < info.min or hi > info.max:
                    raise DatasetError(f"{self.prefix}: token id {int(hi if hi > info.max else lo)} does not fit "
                                       f"{self.dtype.name}; build with dtype=np.int32 (vocabulary >= 65,500)")
            tokens = tokens.astype(self.dtype)
        self._write_bytes(np.ascontiguousarray(tokens).tobytes())

    def _write_bytes(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as e:
            raise os_error(self._tmp_bin, e) from None

    def add_item(self, tokens) -> None:
        """One sequence; close the document with `end_document()` (Megatron's add_item semantics)."""
        tokens = np.asarray(tokens).reshape(-1)
        self._write(tokens)
        self._lengths.append(np.array([tokens.size], dtype=np.int32))
        self._num_sequences += 1
        self._pending_sequences += 1

    def end_document(self) -> None:
        self._doc_ends.append(np.array([self._num_sequences], dtype=np.int64))
        self._pending_sequences = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents at once: `tokens` is their concatenation, `lengths` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != np.asarray(tokens).size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {np.asarray(tokens).size} tokens given")
        self._write(tokens)
        self._lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(self._num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64))
        self._num_sequences += len(lengths)

    def add_index(self, prefix: str, chunk_bytes: int = 1 << 24) -> None:
        """Append every document of an existing dataset (document boundaries preserved)."""
        ds = IndexedDataset(prefix)
        if ds.dtype != self.dtype:
            raise DatasetError(f"{ds.idx_path}: dtype {ds.dtype.name} differs from the output's "
                               f"{self.dtype.name}; re-preprocess it with the same tokenizer")
        if self._pending_sequences:
            raise DatasetError(f"{self.prefix}: call end_document() before add_index({prefix!r})")
        try:
            src = open(ds.bin_path, "rb")
        except OSError as e:
            raise os_error(ds.bin_path, e, "read") from None
        with src:
            while chunk := src.read(chunk_bytes):
                self._write_bytes(chunk)
        self._lengths.append(np.array(ds.sequence_lengths, dtype=np.int32))
        self._doc_ends.append(self._num_sequences + np.asarray(ds.document_indices[1:], dtype=np.int64))
        self._num_sequences += len(ds)

    def finalize(self) -> None:
        """Write the index and rename both files into place (`.bin` first, so `.idx` marks completeness).

        On failure the temporary files are removed and the error raised."""
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        if self._pending_sequences:
            self.end_document()
        try:
            self._bin.close()  # flushes: a full disk can fail here
        except OSError as e:
            raise os_error(self._tmp_bin, e) from None
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_idx = np.concatenate([np.zeros(1, np.int64)] + self._doc_ends)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        try:
            with open(self._tmp_idx, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(doc_idx)))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(doc_idx.astype("<i8").tobytes())
            for tmp in (self._tmp_bin, self._tmp_idx):
                fsync_file(tmp)
        except OSError as e:
            raise os_error(self._tmp_idx, e) from None
        if self.identity is not None:
            try:
                with open(self._tmp_sidecar, "wb") as f:
                    f.write(sidecar_bytes(self.identity, os.path.getsize(self._tmp_bin),
                                          os.path.getsize(self._tmp_idx)))
                fsync_file(self._tmp_sidecar)
            except OSError as e:
                raise os_error(self._tmp_sidecar, e) from None
        # every file is complete: only renames are left. .idx (and the old sidecar) go first so no reader ever
        # pairs an old .idx or sidecar with the new .bin; the new .idx comes last and marks completeness
        try:
            with renaming():
                for old in (idx_path(self.prefix), sidecar_path(self.prefix)):
                    if os.path.exists(old):
                        os.remove(old)
                os.replace(self._tmp_bin, bin_path(self.prefix))
                if self.identity is not None:
                    os.replace(self._tmp_sidecar, sidecar_path(self.prefix))
                os.replace(self._tmp_idx, idx_path(self.prefix))
        except OSError as e:
            raise os_error(self.prefix, e, "rename the new .bin/.idx into place") from None
        self.finalized = True

    def abort(self) -> None:
        """Close and delete the temporary files (no-op after finalize)."""
        if self.finalized:
            return
        try:
            self._bin.close()
        except OSError:  # the buffered tail cannot be flushed (full disk): the file is deleted anyway
            pass
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_sidecar):
            remove_quietly(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.finalized:
            self.finalize()


def discard_build(prefix: str) -> None:
    """Remove this process's temporary files for PREFIX (for an interrupt that lands before a builder exists
    to abort, e.g. between its creation and the `with` block)."""
    for path in _outputs(prefix):
        remove_quietly(tmp_name(path))


def _outputs(prefix: str) -> tuple[str, str, str]:
    return bin_path(prefix), idx_path(prefix), sidecar_path(prefix)


def write_dataset(prefix: str, documents: Iterable, dtype=np.uint16) -> str:
    """Convenience: write a list of token sequences, one document each. Returns the prefix."""
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for doc in documents:
            builder.add_item(doc)
            builder.end_document()
    return prefix
