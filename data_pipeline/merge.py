"""Merge several datasets into one, keeping every document boundary and their order.

    python -m data_pipeline.merge --input shard0 shard1 shard2 --output-prefix data/all

Every input is checked before anything is written (datasets of different tokenizers are refused); the output is
renamed into place when complete, with the inputs' common tokenizer record (data_pipeline.provenance).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data_pipeline.errors import DatasetError, UserError
from data_pipeline.files import (check_output_prefix, dataset_interrupted, report_deferred_signal,
                                 stop_on_signals)
from data_pipeline.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, discard_build
from data_pipeline.provenance import TokenizerIdentity, read_identity, sidecar_path

log = logging.getLogger(__name__)


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets document by document; returns the merged dataset."""
    if not prefixes:
        raise DatasetError("--input: no datasets given; pass two or more prefixes")
    check_output_prefix(output_prefix, (".bin", ".idx"), "--output-prefix")
    datasets = [IndexedDataset(p) for p in prefixes]
    seen: dict[tuple[int, int], str] = {}
    for ds in datasets:
        key = _file_id(ds.idx_path)
        if key in seen:
            raise DatasetError(f"--input {ds.prefix}: the same dataset as {seen[key]}, given twice (its documents "
                               f"would be duplicated); give each input once")
        seen[key] = ds.prefix
    out_ids = {_file_id(f"{output_prefix}{ext}") for ext in (".idx", ".bin") if os.path.exists(output_prefix + ext)}
    for ds in datasets:
        if out_ids & {_file_id(ds.idx_path), _file_id(ds.bin_path)}:
            raise DatasetError(f"--output-prefix {output_prefix}: is also an input ({ds.prefix}), which it would "
                               f"overwrite; choose a new prefix")
    identity = common_identity(prefixes)
    dtypes = {ds.dtype.name for ds in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{ds.prefix}: {ds.dtype.name}" for ds in datasets)
        raise DatasetError(f"--input: token dtypes differ ({detail}); preprocess every shard with the same "
                           f"tokenizer")
    try:
        with IndexedDatasetBuilder(output_prefix, datasets[0].dtype, identity) as builder:
            for ds in datasets:
                builder.add_index(ds.prefix)
    except BaseException:
        discard_build(output_prefix)
        raise
    return IndexedDataset(output_prefix)


def common_identity(prefixes: list[str]) -> TokenizerIdentity | None:
    """The one tokenizer that made every input, or None when some input has no record (warned when others have);
    inputs made by
    different tokenizers are refused, naming two of them."""
    identities = {p: read_identity(p) for p in prefixes}
    recorded = {p: i for p, i in identities.items() if i is not None}
    first = next(iter(recorded), None)
    for p, i in recorded.items():
        if i != recorded[first]:
            raise DatasetError(f"--input: {first} and {p} were made by different tokenizers ({recorded[first].describe()}"
                               f" vs {i.describe()}, from {sidecar_path(first)} and {sidecar_path(p)}); their ids "
                               f"mean different text: preprocess every input with the same tokenizer")
    missing = [p for p, i in identities.items() if i is None]
    if recorded and missing:
        log.warning("%s: no tokenizer record (made by another tool) while %s has one: the merged dataset gets none",
                    ", ".join(missing), first)
    return recorded[first] if recorded and not missing else None


def _file_id(path: str) -> tuple[int, int]:
    """(device, inode): equal for two spellings of one file, or two links to it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():
            ds = merge(args.input, args.output_prefix)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return dataset_interrupted(args.output_prefix, e)
    report_deferred_signal(args.output_prefix)
    print(f"merge: {ds.prefix}.bin/.idx: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens from "
          f"{len(args.input)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
