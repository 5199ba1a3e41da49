"""Train a tokenizer on any corpus preprocess reads (docs/data-formats.md): sentencepiece BPE (default) or a
byte-level BPE.

    python -m data_pipeline.train_tokenizer --input corpus.jsonl --model-prefix tok --vocab-size 32000
    python -m data_pipeline.train_tokenizer --type bpe-bytelevel --input corpus.jsonl --model-prefix tok

Both round-trip text exactly (`decode(encode(text)) == text`); EOD is the eos. Outputs are renamed into place when
complete. Special ids and options: docs/data-pipeline.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import sentencepiece as spm

from data_pipeline.corpus import ReadStats, check_inputs, iter_documents
from data_pipeline.errors import DatasetError, UserError
from data_pipeline.atomic import remove_quietly, remove_stale_temps, tmp_name, write_text
from data_pipeline.files import (check_output_prefix, exit_code, make_parent_dir, os_error, replace_all,
                                 stop_on_signals)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3  # the ids given to sentencepiece's special pieces
BPE_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "pad_token": "<|padding|>"}
MAX_SENTENCE_BYTES = 4192  # sentencepiece's own default; longer lines are split into pieces of this size
MAX_THREADS = 1024         # sentencepiece's limit
# with --skip-bad-lines, at least this share of the input's lines must be readable: a tokenizer learned from the
# few lines that happened to parse is not a tokenizer of the corpus (a wrong --json-keys, a binary file)
MIN_READABLE_FRACTION = 0.5


def check_arguments(model_prefix: str, vocab_size: int, json_key: str, input_sentence_size: int,
                    num_threads: int | None, seed: int, character_coverage: float) -> None:
    """Refuse, before reading any input, what sentencepiece would refuse later with a less clear message."""
    check_output_prefix(model_prefix, (".model", ".vocab"), "--model-prefix")
    if not 260 <= vocab_size < 2**31:
        raise DatasetError(f"--vocab-size {vocab_size}: " + ("too small; byte fallback alone needs 256 + 4 special "
                           "ids, use at least 260 (typically 8192-65536)" if vocab_size < 260 else
                           "too large (sentencepiece's limit is 2**31 - 1); typically 8192-65536"))
    if not json_key:
        raise DatasetError(f"--json-keys {json_key!r}: empty; give the JSON key that holds the text (e.g. text)")
    if input_sentence_size < 0:
        raise DatasetError(f"--input-sentence-size {input_sentence_size}: must be >= 0 (0 = every line)")
    if num_threads is not None and not 1 <= num_threads <= MAX_THREADS:
        raise DatasetError(f"--workers {num_threads}: must be in [1, {MAX_THREADS}]")
    if not 0 <= seed < 2**32:
        raise DatasetError(f"--seed {seed}: must be in [0, 2**32)")
    if not 0.98 <= character_coverage <= 1.0:
        raise DatasetError(f"--character-coverage {character_coverage}: sentencepiece accepts [0.98, 1.0] "
                           f"(default 0.9995)")


def check_readable(inputs: list[str], stats: ReadStats) -> None:
    """After --skip-bad-lines reading: refuse, with the counts, an input that is mostly unreadable lines."""
    if stats.bad_lines and stats.lines - stats.bad_lines < MIN_READABLE_FRACTION * stats.lines:
        raise DatasetError(f"--input {' '.join(inputs)}: {stats.bad_lines:,} of {stats.lines:,} lines are unreadable "
                           f"(e.g. {stats.first_bad[0]}); a tokenizer of the {stats.lines - stats.bad_lines:,} "
                           f"others would not describe this corpus: fix the input or --json-keys; nothing written")


def _sentences(inputs: list[str], json_key: str, stats: ReadStats, failure: list, skip_bad_lines: bool):
    """Training 'sentences' are the non-empty lines of each document (newlines are byte-fallback tokens).

    A DatasetError (an unreadable file) or an interrupt is also kept in `failure`: sentencepiece turns it into a
    RuntimeError."""
    try:
        yield from _lines(inputs, json_key, stats, skip_bad_lines)
    except (DatasetError, KeyboardInterrupt) as e:
        failure.append(e)
        raise


def _lines(inputs: list[str], json_key: str, stats: ReadStats, skip_bad_lines: bool):
    for text in iter_documents(inputs, json_key, skip_bad_lines=skip_bad_lines, stats=stats):
        for line in text.split("\n"):
            if not line.strip():
                continue
            while len(line) > MAX_SENTENCE_BYTES // 4:  # keep every piece under the byte limit (utf-8 <= 4 B/char)
                yield line[:MAX_SENTENCE_BYTES // 4]
                line = line[MAX_SENTENCE_BYTES // 4:]
            yield line


def train_tokenizer(inputs: list[str], model_prefix: str, vocab_size: int = 32000, model_type: str = "bpe",
                    json_key: str = "text", input_sentence_size: int = 1_000_000, num_threads: int | None = None,
                    seed: int = 0, character_coverage: float = 0.9995, quiet: bool = False,
                    skip_bad_lines: bool = False) -> str:
    """Train and write `model_prefix.model` (+ `.vocab`); returns the model path. An unreadable line is an error
    naming it, unless `skip_bad_lines` (then at most half of the lines may be unreadable)."""
    sources = check_inputs(list(inputs))
    check_arguments(model_prefix, vocab_size, json_key, input_sentence_size, num_threads, seed, character_coverage)
    stats, failure = ReadStats(), []
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(sources, json_key, stats, failure, skip_bad_lines), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2 if quiet else 1)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        msg = str(e)
        if "sentences_.empty()" in msg:
            example = f" (e.g. {stats.first_bad[0]})" if stats.first_bad else ""
            raise DatasetError(f"--input {' '.join(inputs)}: no training text: {stats.lines} lines, "
                               f"{stats.bad_lines} unreadable{example}; check the files and --json-keys "
                               f"{json_key}") from None
        if "smaller than required_chars" in msg:
            raise DatasetError(f"--vocab-size {vocab_size}: too small for this corpus's characters ({msg.strip()}); "
                               f"raise --vocab-size or lower --character-coverage") from None
        if "Vocabulary size too high" in msg:
            raise DatasetError(f"--vocab-size {vocab_size}: too large for this corpus ({msg.strip()}); lower "
                               f"--vocab-size or add text") from None
        raise DatasetError(f"sentencepiece training failed on {list(inputs)}: {msg.strip()}") from None
    check_readable(inputs, stats)
    if stats.bad_lines and not quiet:
        print(f"train_tokenizer: skipped {stats.bad_lines} unreadable lines, e.g. {stats.first_bad[0]}",
              file=sys.stderr)
    path = f"{model_prefix}.model"
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    _write_files({path: model.getvalue(), f"{model_prefix}.vocab": vocab.encode("utf-8")})
    if not quiet:
        print(f"train_tokenizer: {path}: {model_type} vocab {vocab_size} from {stats.lines} lines "
              f"({stats.bytes / 1e6:.1f} MB) in {time.time() - t0:.1f} s", file=sys.stderr)
    return path


def _write_files(contents: dict[str, bytes]) -> None:
    """Write every file under a temporary name, then rename them all (the .model last); nothing half-written."""
    pairs = []
    try:
        for path, data in sorted(contents.items(), key=lambda kv: kv[0].endswith(".model")):
            make_parent_dir(path, "--model-prefix")
            remove_stale_temps(path)
            pairs.append((tmp_name(path), path))
            try:
                with open(pairs[-1][0], "wb") as f:
                    f.write(data)
            except OSError as e:
                raise os_error(pairs[-1][0], e) from None
    except BaseException:
        for tmp, _ in pairs:
            remove_quietly(tmp)
        raise
    replace_all(pairs)


def train_bytelevel_bpe(inputs: list[str], out_dir: str, vocab_size: int = 32000, json_key: str = "text",
                        min_frequency: int = 2, quiet: bool = False, skip_bad_lines: bool = False) -> str:
    """Train a byte-level BPE with `tokenizers` and write the HF tokenizer directory `out_dir`; returns it.

    The library trains in its own thread pool (RAYON_NUM_THREADS, set by the CLI from --workers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sources = check_inputs(list(inputs))
    if vocab_size < 256 + len(BPE_SPECIALS):
        raise DatasetError(f"--vocab-size {vocab_size}: too small; a byte-level BPE holds the 256 bytes and "
                           f"{len(BPE_SPECIALS)} special tokens, use at least {256 + len(BPE_SPECIALS)} "
                           f"(typically 32000-65536)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--model-prefix {out_dir}: is a file; a byte-level BPE is written as a directory "
                           f"(tokenizer.json, tokenizer_config.json, ...): choose another --model-prefix")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(BPE_SPECIALS.values()),  # ids 0, 1, 2 in this order
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=not quiet)
    stats = ReadStats()
    t0 = time.time()
    tok.train_from_iterator(iter_documents(sources, json_key, skip_bad_lines=skip_bad_lines, stats=stats), trainer)
    check_readable(inputs, stats)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **BPE_SPECIALS, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    out.mkdir(parents=True, exist_ok=True)
    # the tokenizer last: a crash in between leaves the old tokenizer.json beside the same special-token names
    for name, text in (("tokenizer_config.json", json.dumps(config, indent=2) + "\n"),
                       ("special_tokens_map.json", json.dumps(BPE_SPECIALS, indent=2) + "\n"),
                       ("tokenizer.json", tok.to_str(pretty=True))):
        write_text(out / name, text)
    if stats.bad_lines and not quiet:
        print(f"train_tokenizer: skipped {stats.bad_lines} unreadable lines, e.g. {stats.first_bad[0]}",
              file=sys.stderr)
    if not quiet:
        print(f"train_tokenizer: {out}/tokenizer.json: byte-level BPE vocab {tok.get_vocab_size()} (asked "
              f"{vocab_size}) from {stats.lines} documents ({stats.bytes / 1e6:.1f} MB) in {time.time() - t0:.1f} s",
              file=sys.stderr)
    return str(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json/.txt files (optionally .gz/.zst), "
                   ".parquet/.arrow files, `datasets` directories, or directories/globs of these")
    p.add_argument("--type", choices=["sentencepiece", "bpe-bytelevel"], default="sentencepiece",
                   help="sentencepiece (default) or a byte-level BPE trained with the Hugging Face tokenizers library")
    p.add_argument("--model-prefix", required=True, help="sentencepiece: writes MODEL_PREFIX.model and "
                   "MODEL_PREFIX.vocab; bpe-bytelevel: the directory MODEL_PREFIX/ (tokenizer.json, ...)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece's algorithm "
                   "(default bpe; evidence.export_hf cannot export a unigram model to Hugging Face)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON key(s) holding the text (default text)")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="sample this many lines of large inputs for training (default 1,000,000; 0 = all)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="training threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the line sampling")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip invalid JSON / missing key / non-UTF-8 lines "
                   "and count them, instead of failing (at most half of the lines)")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if len(args.json_keys) > 1:
            raise DatasetError(f"--json-keys {args.json_keys}: give one key (run once per field, or merge the "
                               f"fields into one)")
        with stop_on_signals():
            if args.type == "bpe-bytelevel":
                os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # the library's pool, created at first use
                train_bytelevel_bpe(args.input, args.model_prefix, args.vocab_size, args.json_keys[0],
                                    quiet=args.quiet, skip_bad_lines=args.skip_bad_lines)
                return 0
            train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_keys[0],
                            args.input_sentence_size, args.workers, args.seed, args.character_coverage, args.quiet,
                            args.skip_bad_lines)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'SIGINT'}): {args.model_prefix}.model/.vocab not written (existing ones are "
              f"unchanged)", file=sys.stderr)
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
