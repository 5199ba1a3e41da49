"""Inspect a dataset (header, counts, the tokenizer that made it, document lengths, the first document) and check
every invariant, including that --tokenizer-model is the tokenizer recorded in PREFIX.tokenizer.json.

    python -m data_pipeline.inspect data/corpus [--tokenizer-model tok.model]

Exit status: 0 all good, 1 an invariant is violated (named), 2 a bad flag or a missing or unreadable file.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data_pipeline.errors import DatasetError, UserError
from data_pipeline.indexed_dataset import IndexedDataset, bin_path, check_prefix, idx_path
from data_pipeline.provenance import check_tokenizer, read_identity, sidecar_path

CHUNK_TOKENS = 1 << 24


def check_token_ids(ds: IndexedDataset, vocab_size: int) -> None:
    """Raise DatasetError at the first token id outside [0, vocab_size) (scans .bin in chunks)."""
    if not np.issubdtype(ds.dtype, np.integer):
        raise DatasetError(f"{ds.idx_path}: token dtype {ds.dtype.name} is not an integer type, so its values are "
                           f"not token ids; re-create it with `python -m data_pipeline.preprocess`")
    for start in range(0, ds.num_tokens, CHUNK_TOKENS):
        chunk = np.asarray(ds.tokens[start:start + CHUNK_TOKENS])
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if len(bad):
            pos = start + int(bad[0])
            seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
            seq = int(np.searchsorted(seq_starts, pos, side="right") - 1)
            doc = int(np.searchsorted(ds.document_indices, seq, side="right") - 1)
            raise DatasetError(f"{ds.bin_path}: token id {int(chunk[bad[0]])} at token {pos} (document {doc}) is "
                               f"outside the vocabulary [0, {vocab_size}); was it preprocessed with another "
                               f"tokenizer? Re-run preprocess with the matching --tokenizer-model")


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Power-of-two buckets: [(lo, hi, count)] for lengths in [lo, hi)."""
    if len(lengths) == 0:
        return []
    edges = [0, 1] + [2 ** k for k in range(1, int(np.ceil(np.log2(max(int(lengths.max()), 1) + 1))) + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    return [(lo, hi, int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts) if c]


def report(ds: IndexedDataset, tokenizer=None, out=None) -> None:
    """Print the summary; the first document is decoded only when all its ids are in the tokenizer's range."""
    out = out if out is not None else sys.stdout
    _, doc_lengths = ds.document_token_bounds()
    identity = read_identity(ds.prefix)  # raises on a damaged or stale record
    print(f"dataset     {ds.prefix}", file=out)
    print(f"header      MMIDIDX version 1, dtype {ds.dtype.name} ({ds.dtype.itemsize} bytes/token)", file=out)
    print(f"tokenizer   {identity.describe() if identity else 'not recorded (no ' + sidecar_path(ds.prefix) + ')'}",
          file=out)
    print(f"documents   {ds.num_documents:,}", file=out)
    print(f"sequences   {len(ds):,}", file=out)
    print(f"tokens      {ds.num_tokens:,}", file=out)
    if ds.num_documents:
        print(f"doc length  min {int(doc_lengths.min()):,}  median {int(np.median(doc_lengths)):,}  "
              f"mean {doc_lengths.mean():,.1f}  max {int(doc_lengths.max()):,}", file=out)
        print("length histogram (tokens per document)", file=out)
        hist = length_histogram(doc_lengths)
        top = max(c for _, _, c in hist)
        for lo, hi, c in hist:
            print(f"  [{lo:>8,}, {hi:>8,})  {c:>10,}  {'#' * max(1, round(40 * c / top))}", file=out)
    first = ds.document(0) if tokenizer is not None and ds.num_documents else None
    if first is not None and np.issubdtype(ds.dtype, np.integer) and len(first) and (
            first.min() < 0 or first.max() >= tokenizer.vocab_size):
        print(f"first document not decoded: it holds ids outside the tokenizer's [0, {tokenizer.vocab_size})",
              file=out)
    elif first is not None:
        text = tokenizer.decode(first)
        print(f"first document decoded ({len(text):,} chars):", file=out)
        print(text[:2000] + (" [...]" if len(text) > 2000 else ""), file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin + PREFIX.idx)")
    p.add_argument("--tokenizer-model", help="decode the first document and check ids < its vocabulary")
    p.add_argument("--vocab-size", type=int, help="check ids < this (when no tokenizer is given)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `inspect ... | head`: the reader left; say nothing more, like other Unix tools
        try:  # so that flushing stdout at exit does not fail a second time
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = None
    try:
        if args.vocab_size is not None and args.tokenizer_model:
            raise DatasetError(f"--vocab-size {args.vocab_size} and --tokenizer-model {args.tokenizer_model}: give "
                               f"one (the tokenizer's vocabulary is its size)")
        if args.vocab_size is not None and args.vocab_size < 1:
            raise DatasetError(f"--vocab-size {args.vocab_size}: must be a positive number of ids")
        check_prefix(args.prefix)  # a missing file is a usage error (2), a damaged one an invalid dataset (1)
        for path in (idx_path(args.prefix), bin_path(args.prefix)):
            if not os.access(path, os.R_OK):
                raise DatasetError(f"{path}: not readable (permission denied); fix its permissions")
        if args.tokenizer_model:
            from data_pipeline.tokenizer import Tokenizer
            tokenizer = Tokenizer(args.tokenizer_model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        ds = IndexedDataset(args.prefix)  # checks every structural invariant
        vocab = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
        report(ds, tokenizer)
        if tokenizer is not None:
            check_tokenizer(args.prefix, tokenizer, "--tokenizer-model")
        identity = read_identity(args.prefix)
        if args.vocab_size is not None and identity is not None and identity.vocab_size > args.vocab_size:
            raise DatasetError(f"--vocab-size {args.vocab_size}: {sidecar_path(args.prefix)} records a tokenizer of "
                               f"{identity.vocab_size:,} ids, more than this vocabulary")
        if vocab is not None:
            check_token_ids(ds, vocab)
    except DatasetError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    print(f"OK: all invariants hold{f' (token ids < {vocab})' if vocab is not None else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
