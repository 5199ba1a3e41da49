"""Merge several datasets into one, keeping every document boundary (sharded preprocessing, then merge).

    python -m data_pipeline.merge --input shard0 shard1 shard2 --output-prefix data/all

Inputs and output are prefixes (PREFIX.bin/.idx). Documents keep their order: all of shard0, then shard1, ...
Every input is opened (and so fully checked) before anything is written; the output is written under temporary
names and renamed when complete.
"""
from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets document by document; returns the merged dataset."""
    if not prefixes:
        raise DatasetError("--input: no datasets given; pass two or more prefixes")
    if output_prefix in prefixes:
        raise DatasetError(f"--output-prefix {output_prefix}: is also an input; choose a new prefix")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {ds.dtype.name for ds in datasets}
    if len(dtypes) > 1:
        detail = ", ".join(f"{ds.prefix}: {ds.dtype.name}" for ds in datasets)
        raise DatasetError(f"--input: token dtypes differ ({detail}); preprocess every shard with the same "
                           f"tokenizer")
    with IndexedDatasetBuilder(output_prefix, datasets[0].dtype) as builder:
        for ds in datasets:
            builder.add_index(ds.prefix)
    return IndexedDataset(output_prefix)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ds = merge(args.input, args.output_prefix)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merge: {ds.prefix}.bin/.idx: {ds.num_documents:,} documents, {ds.num_tokens:,} tokens from "
          f"{len(args.input)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
