r"""Tokenize corpora into a Megatron MMIDIDX v1 dataset, PREFIX.bin + PREFIX.idx, with EOD after every document.

    python -m data_pipeline.preprocess --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-model tok.model --workers 2

Inputs: .jsonl/.json/.txt (optionally .gz/.zst), .parquet/.arrow, `datasets` directories, directories and globs
of these (docs/data-formats.md). Flags follow Megatron-LM's tools/preprocess_data.py. The output is renamed into
place when complete, with OUTPUT_PREFIX.tokenizer.json recording the tokenizer that made it (data_pipeline.provenance),
and its bytes do not depend on --workers or the input format; errors exit 2 with one line
naming the file and the fix. Reference: docs/data-pipeline.md.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from data_pipeline.corpus import ReadStats, check_inputs, is_compressed_or_columnar, iter_documents
from data_pipeline.errors import DatasetError, UserError
from data_pipeline.files import (check_output_prefix, dataset_interrupted, report_deferred_signal,
                                 stop_on_signals)
from data_pipeline.indexed_dataset import IndexedDatasetBuilder, discard_build, optimal_dtype
from data_pipeline.provenance import TokenizerIdentity
from data_pipeline.tokenizer import Tokenizer

BATCH_BYTES = 1 << 20   # text per encode call: large enough to keep the encoder threads busy
BATCH_DOCS = 4096
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HF_TYPES = ("HuggingFaceTokenizer",)


@dataclass
class Summary:
    """What a preprocess run did (printed at the end, returned by `preprocess`)."""
    output_prefix: str
    documents: int = 0
    empty_documents: int = 0
    bad_lines: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        mb = self.input_bytes / 1e6
        s = max(self.seconds, 1e-9)
        return (f"preprocess: {self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens "
                f"from {mb:,.1f} MB in {self.seconds:.1f} s ({mb / s:.2f} MB/s, {self.tokens / s / 1e6:.2f}M tok/s); "
                f"skipped {self.empty_documents:,} empty documents and {self.bad_lines:,} bad lines")


_DONE = object()


def _producer(docs, out: queue.Queue, stop: threading.Event, stats: ReadStats) -> None:
    """Reader thread: group documents into batches of ~BATCH_BYTES of text."""
    try:
        batch, size = [], 0
        for text in docs:
            if stop.is_set():
                return
            batch.append(text)
            size += len(text)
            if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                out.put((batch, stats.bytes))
                batch, size = [], 0
        if batch:
            out.put((batch, stats.bytes))
        out.put(_DONE)
    except BaseException as e:  # handed to the main thread, which re-raises it
        out.put(e)
    finally:
        docs.close()  # closes the input file, also when stopped early


def _to_tokens(ids: list[np.ndarray], eod: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-document ids (+ EOD after each): (tokens, lengths)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids).astype(dtype, copy=False) if ids else np.zeros(0, dtype)
    if eod is not None:
        flat = np.insert(flat, np.cumsum(lengths), np.asarray(eod, dtype=dtype))
        lengths = lengths + 1
    return flat, lengths


def preprocess(inputs: list[str], output_prefix: str, tokenizer_model: str, workers: int = 1,
               json_key: str = "text", append_eod: bool = True, skip_bad_lines: bool = False,
               progress: bool = True, quiet: bool = False) -> Summary:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; returns the Summary (also printed unless quiet)."""
    if workers < 1:
        raise DatasetError(f"--workers {workers}: must be at least 1")
    if not json_key:
        raise DatasetError(f"--json-keys {json_key!r}: empty; give the JSON key that holds the text (e.g. text)")
    sources = check_inputs(list(inputs))
    check_output_prefix(output_prefix, (".bin", ".idx"), "--output-prefix")
    tok = Tokenizer(tokenizer_model)
    dtype = optimal_dtype(tok.vocab_size)
    t0 = time.time()
    stats = ReadStats()
    summary = Summary(output_prefix)
    batches: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    docs = iter_documents(sources, json_key, skip_bad_lines, stats)
    reader = threading.Thread(target=_producer, args=(docs, batches, stop, stats), daemon=True)
    total = None if any(map(is_compressed_or_columnar, sources)) else sum(map(os.path.getsize, sources))
    bar = None
    if progress and not quiet:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, smoothing=0.1)
    writer_pool = None
    try:
        writer_pool = _Writer(IndexedDatasetBuilder(output_prefix, dtype, TokenizerIdentity.of(tok)))
        reader.start()
        read_bytes = 0
        while (item := batches.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            texts, bytes_so_far = item
            kept = [t for t in texts if t.strip()]
            summary.empty_documents += len(texts) - len(kept)
            ids = tok.encode_batch_numpy(kept, num_threads=workers)  # releases the GIL
            writer_pool.submit(ids, tok.eod_id if append_eod else None, dtype)
            summary.documents += len(kept)
            if bar is not None:
                bar.update(bytes_so_far - read_bytes)
                bar.set_postfix_str(f"{summary.documents / max(time.time() - t0, 1e-9):,.0f} docs/s", refresh=False)
            read_bytes = bytes_so_far
        if summary.documents == 0:
            example = f" (e.g. {stats.first_bad[0]})" if stats.first_bad else ""
            raise DatasetError(f"--input {' '.join(inputs)}: no documents: {stats.lines} lines, "
                               f"{summary.empty_documents} empty, {stats.bad_lines} bad{example}; nothing written. "
                               f"Check the files and --json-keys {json_key}")
        summary.tokens = writer_pool.close()
        summary.bad_lines, summary.input_bytes = stats.bad_lines, stats.bytes
        summary.seconds = time.time() - t0
    except BaseException:
        stop.set()
        if writer_pool is not None:
            writer_pool.abort()
        discard_build(output_prefix)  # also when the interrupt came before the builder could be aborted
        while reader.is_alive():  # unblock the reader so it closes its input file
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        print(summary.line(), file=sys.stderr)
        for example in stats.first_bad:
            print(f"  skipped: {example}", file=sys.stderr)
    return summary


class _Writer:
    """Writer thread: converts encoded batches to one array and appends them to the builder, in order."""

    def __init__(self, builder: IndexedDatasetBuilder):
        self.builder = builder
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.tokens = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            try:
                flat, lengths = _to_tokens(*job)
                self.builder.add_documents(flat, lengths)
                self.tokens += flat.size
            except BaseException as e:
                self.error = e

    def submit(self, ids, eod, dtype) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put((ids, eod, dtype))

    def close(self) -> int:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.builder.finalize()
        return self.tokens

    def abort(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.builder.abort()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input/output (Megatron-LM names)")
    g.add_argument("--input", nargs="+", required=True, help=".jsonl/.json/.txt files (optionally .gz/.zst), "
                   ".parquet/.arrow files, `datasets` directories, or directories/globs of these")
    g.add_argument("--output-prefix", required=True, help="writes exactly OUTPUT_PREFIX.bin, OUTPUT_PREFIX.idx and "
                   "OUTPUT_PREFIX.tokenizer.json (the tokenizer that made it)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON key (Parquet/Arrow: column) holding the text "
                   "(default text)")
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model, Hugging Face tokenizer.json or "
                   "a directory holding one (data_pipeline.train_tokenizer makes either)")
    g.add_argument("--tokenizer-type", default=None, help="accepted for compatibility (the kind is read from "
                   f"--tokenizer-model); one of {', '.join(SENTENCEPIECE_TYPES + HF_TYPES)}")
    g.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the EOD id (the tokenizer's eos) to every document (default on; --no-append-eod "
                   "to disable)")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding threads (default: all cores)")
    g.add_argument("--log-interval", type=int, default=None, help="accepted for compatibility (a progress bar "
                   "replaces the log lines)")
    g.add_argument("--split-sentences", action="store_true", help="not supported (documents are not split)")
    g.add_argument("--partitions", type=int, default=1, help="only 1; shard the input and use data_pipeline.merge")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip invalid JSON / missing key / non-UTF-8 lines and count them, instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def check_tokenizer_type(tokenizer_type: str | None, tokenizer_model: str) -> None:
    """Megatron's --tokenizer-type, if given, must name a kind we read and agree with --tokenizer-model's kind."""
    if tokenizer_type is None:
        return
    if tokenizer_type not in SENTENCEPIECE_TYPES + HF_TYPES:
        raise DatasetError(f"--tokenizer-type {tokenizer_type}: not supported; use one of "
                           f"{', '.join(SENTENCEPIECE_TYPES + HF_TYPES)} or leave it out (the kind is read from "
                           f"--tokenizer-model: a sentencepiece .model, a tokenizer.json or its directory)")
    kind = Tokenizer(tokenizer_model).kind
    if (kind == "huggingface") != (tokenizer_type in HF_TYPES):
        raise DatasetError(f"--tokenizer-type {tokenizer_type} but --tokenizer-model {tokenizer_model} is a {kind} "
                           f"tokenizer; drop --tokenizer-type or give the matching one")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_tokenizer_type(args.tokenizer_type, args.tokenizer_model)
        if len(args.json_keys) != 1:
            raise DatasetError(f"--json-keys {args.json_keys}: give exactly one key (the output is a single "
                               f"PREFIX.bin/.idx); run once per key with different --output-prefix")
        if args.split_sentences:
            raise DatasetError("--split-sentences: not supported; documents are kept whole (GrowLength cuts "
                               "fixed-length windows from the document stream)")
        if args.partitions != 1:
            raise DatasetError(f"--partitions {args.partitions}: not supported; shard the input yourself, "
                               f"preprocess each shard, and combine with `python -m data_pipeline.merge`")
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # HF tokenizers' pool, created at its first use
        with stop_on_signals():
            preprocess(args.input, args.output_prefix, args.tokenizer_model, args.workers, args.json_keys[0],
                       args.append_eod, args.skip_bad_lines, progress=not args.no_progress, quiet=args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return dataset_interrupted(args.output_prefix, e)
    report_deferred_signal(args.output_prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
