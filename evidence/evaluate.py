"""Perplexity at several sequence lengths, including lengths past the longest trained one (the paper's Figure 4).

    python -m evidence.evaluate --checkpoint RUN_DIR_OR_CHECKPOINT_OR_HF_DIR [--data-prefix PREFIX]
        [--lengths 128,256,...,4096] [--rope-scaling none|linear|ntk] [--rope-factor F] [--tokens N]
        [--split auto|run|all] [--device auto|cpu|cuda[:N]] [--dtype auto|fp32|bf16|fp16] [--out JSON]

Scores whole, untruncated windows of the validation stream by the same rule as the launcher's in-loop validation,
so at equal --tokens the two measure the same windows. --split: run (the run's held-out documents), all (every
document: a separate corpus), auto (run on the training data, else all). --device/--dtype: CUDA in bf16 where CUDA is
usable, else the CPU in fp32 (the attention kernel is chosen for the device, whatever the run trained with). Details:
docs/tools.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import torch

from data_pipeline.errors import DatasetError, UserError
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.loader import window_batches
from data_pipeline.samples import WindowStream, data_fingerprint
from evidence.runs import (EvidenceError, add_device_arguments, check_writable, compute_device, dtype_name,
                           find_data_prefix, find_tokenizer, parse_lengths, write_json)
from launcher.checkpoint import CheckpointState
from model import CausalLM
from model.model import mean_loss

log = logging.getLogger("growlength")

DEFAULT_LENGTHS = "128,256,512,1024,2048,4096"
DEFAULT_TOKENS = 16384  # logging.eval_tokens' default


@dataclasses.dataclass
class Loaded:
    """A model to evaluate and what is known about its training."""

    model: CausalLM
    source: str                      # the checkpoint directory or HF directory
    state: CheckpointState | None = None  # a launcher checkpoint's state (None for an HF dir)

    @property
    def trained_seq_len(self) -> int | None:
        return max(s["seq_len"] for s in self.state.plan) if self.state else None


def load_for_eval(path: str, rope_scaling: str = "none", rope_factor: float = 1.0) -> Loaded:
    """A run directory, its checkpoints/, one step_NNNNNNNN (ZeRO shards, via export_hf.load_trained_model) or a
    Hugging Face GPT-NeoX directory -> fp32 model with the requested RoPE scaling, in eval mode."""
    p = Path(path)
    if not p.exists():
        raise EvidenceError(f"--checkpoint {path}: no such file or directory; give a run directory, "
                            f"RUN_DIR/checkpoints/step_NNNNNNNN or a Hugging Face directory (export_hf --out)")
    if (p / "config.json").is_file():
        from model.hf import load_hf
        model, state, source = load_hf(p), None, str(p)
    else:
        from launcher.checkpoint import CheckpointError
        from evidence.export_hf import load_trained_model
        try:
            model, state, found = load_trained_model(p)
        except CheckpointError as e:
            raise EvidenceError(f"--checkpoint {path}: {e}") from None
        source = str(found)
    if rope_scaling != "none" or rope_factor != 1.0:
        try:
            config = dataclasses.replace(model.config, rope_scaling=rope_scaling, rope_scaling_factor=rope_factor)
        except ValueError as e:
            raise EvidenceError(f"--rope-scaling {rope_scaling} --rope-factor {rope_factor}: {e}") from None
        scaled = CausalLM(config)
        scaled.load_state_dict(model.state_dict())  # RoPE tables are not parameters: only the config differs
        model = scaled
    return Loaded(model=model.float().eval(), source=source, state=state)


def check_data_fits(prefix: str, loaded: Loaded) -> None:
    """Refuse data the checkpoint cannot read: made by another tokenizer than the one it trained with (by the data's
    tokenizer record, where both are known), or holding ids past the model's vocabulary."""
    from data_pipeline.inspect import check_token_ids
    from data_pipeline.provenance import check_tokenizer, read_identity
    from data_pipeline.tokenizer import Tokenizer

    vocab = loaded.model.config.vocab_size
    identity = read_identity(prefix)
    if identity is not None:
        if loaded.state is not None:
            try:
                tokenizer_path = find_tokenizer(loaded.state, loaded.source)
            except EvidenceError:
                tokenizer_path = None  # only the vocabulary can be checked
        else:
            # an export keeps the sentencepiece model it converted (tokenizer.model): that file made the data
            src = Path(loaded.source)
            tokenizer_path = (str(src / "tokenizer.model") if (src / "tokenizer.model").is_file() else
                              loaded.source if (src / "tokenizer.json").is_file() else None)
        if tokenizer_path is not None:
            check_tokenizer(prefix, Tokenizer(tokenizer_path), f"--checkpoint {loaded.source}: its tokenizer")
        if identity.vocab_size > vocab:
            raise EvidenceError(f"--data-prefix {prefix}: made by a tokenizer of {identity.vocab_size:,} ids but "
                                f"{loaded.source} has a vocabulary of {vocab:,}; evaluate on data preprocessed "
                                f"with the checkpoint's tokenizer")
        return
    try:
        check_token_ids(IndexedDataset(prefix), vocab)
    except DatasetError as e:
        raise EvidenceError(f"--checkpoint {loaded.source} has a vocabulary of {vocab:,}: {e}") from None


def validation_windows(prefix: str, split: str, valid_fraction: float | None) -> WindowStream:
    """The windows ``--split`` scores (see the module docstring): the run's held-out documents, or every one."""
    if split == "run" and not valid_fraction:
        raise EvidenceError(f"--split run needs the run's data.valid_fraction > 0 (got {valid_fraction}); "
                            f"the run held out no documents: evaluate a separate corpus with --split all")
    dataset = IndexedDataset(prefix)
    return WindowStream.held_out(dataset, valid_fraction) if split == "run" else WindowStream.every_document(dataset)


def resolve_split(split: str, prefix: str, state: CheckpointState | None,
                  valid_fraction: float | None) -> tuple[str, float | None]:
    """``(split, valid_fraction)`` after applying ``auto`` and the checkpoint's config (module docstring)."""
    trained_on = state.data_fingerprint if state else None
    same_data = trained_on is not None and data_fingerprint(prefix) == trained_on
    if valid_fraction is None and state is not None:
        valid_fraction = state.config["data"]["valid_fraction"]
    if split == "auto":
        split = "run" if same_data else "all"
    if split == "all" and same_data:
        log.warning("--split all on the training data %s: these documents were trained on; the perplexity is "
                    "not a held-out measurement", prefix)
    if split == "run" and state is not None and not same_data:
        raise EvidenceError(f"--split run: {prefix} is not the data {state.data_prefix} this checkpoint "
                            f"was trained on (fingerprints differ); use --split all for a separate corpus")
    return split, valid_fraction


def perplexity(model: CausalLM, stream: WindowStream, seq_len: int, max_windows: int, tokens_per_batch: int = 8192,
               dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> tuple[float, int]:
    """Mean next-token loss over every label of ``stream.windows(seq_len, max_windows)`` and the number of labels
    scored, by the launcher's validation loop (``model.model.mean_loss``), on ``device`` in ``dtype``; a model
    trained with document masking is given the windows' document boundaries, as in training."""
    model = model.to(device=device, dtype=dtype)
    batches = window_batches(stream, seq_len, max_windows, tokens_per_batch,
                             documents=model.config.document_masking)
    loss_sum, n_tok = mean_loss(model, batches, device)
    return loss_sum / n_tok, n_tok


def evaluate(checkpoint: str, data_prefix: str | None = None, lengths: list[int] | None = None,
             rope_scaling: str = "none", rope_factor: float = 1.0, tokens: int | None = None, split: str = "auto",
             valid_fraction: float | None = None, dtype: str = "auto", tokens_per_batch: int = 8192,
             device: str = "auto") -> dict:
    """Perplexity of a checkpoint at each length; returns the JSON-able report (see ``main`` for the fields)."""
    lengths = lengths or parse_lengths(DEFAULT_LENGTHS)
    if any(L <= 0 for L in lengths):
        raise EvidenceError(f"lengths {lengths}: every length must be a positive number of tokens")
    if tokens is not None and tokens <= 0:
        raise EvidenceError(f"--tokens {tokens}: must be a positive number of tokens per length")
    if tokens_per_batch <= 0:
        raise EvidenceError(f"--tokens-per-batch {tokens_per_batch}: must be a positive number of tokens")
    if split not in ("auto", "run", "all"):
        raise EvidenceError(f"--split {split!r}: choose auto, run or all")
    where, compute_dtype = compute_device(device, dtype)
    loaded = load_for_eval(checkpoint, rope_scaling, rope_factor)
    state = loaded.state
    if state is None and data_prefix is None:
        raise EvidenceError(f"--checkpoint {checkpoint} is a Hugging Face directory: give --data-prefix PREFIX "
                            f"(a .bin/.idx made with its tokenizer)")
    prefix = find_data_prefix(state, loaded.source, data_prefix)  # --data-prefix, else the run's recorded data
    if tokens is None:
        tokens = state.config["logging"]["eval_tokens"] if state else DEFAULT_TOKENS
    check_data_fits(prefix, loaded)
    split, valid_fraction = resolve_split(split, prefix, state, valid_fraction)
    data = validation_windows(prefix, split, valid_fraction)
    results = []
    for L in lengths:
        t0 = time.perf_counter()
        try:
            windows = data.windows(L, max(1, tokens // L))
        except DatasetError as e:
            log.warning("L=%d skipped: %s", L, e)
            results.append({"seq_len": L, "skipped": str(e)})
            continue
        loss, n_tok = perplexity(loaded.model, data, L, len(windows), tokens_per_batch, compute_dtype, where)
        results.append({"seq_len": L, "windows": int(len(windows)), "tokens": n_tok, "loss": loss,
                        "ppl": math.exp(loss), "seconds": time.perf_counter() - t0})
    if all("skipped" in r for r in results):
        raise EvidenceError(f"{prefix}: no length in {lengths} fits the validation split "
                            f"({data.tokens:,} tokens); evaluate shorter lengths or a larger corpus")
    return {"checkpoint": loaded.source, "step": state.step if state else None,
            "tokens_seen": state.tokens_seen if state else None, "trained_seq_len": loaded.trained_seq_len,
            "data_prefix": prefix, "split": split, "valid_fraction": valid_fraction if split == "run" else None,
            "validation_tokens": data.tokens, "tokens_per_length": tokens,
            "dtype": dtype_name(compute_dtype), "device": str(where),
            "rope_scaling": rope_scaling, "rope_factor": rope_factor,
            "document_masking": loaded.model.config.document_masking, "results": results}


def table(report: dict) -> str:
    """The report as a fixed-width table; lengths past the trained one are marked with '*'."""
    trained = report.get("trained_seq_len")
    head = (f"{report['checkpoint']} (step {report['step']}, trained up to L={trained}) on {report['data_prefix']} "
            f"[{report['split']} split, {report['dtype']}, rope {report['rope_scaling']} x{report['rope_factor']:g}]")
    rows = [head, f"{'seq_len':>8} {'windows':>8} {'tokens':>9} {'loss':>8} {'ppl':>10}", "-" * 47]
    for r in report["results"]:
        mark = "*" if trained and r["seq_len"] > trained else " "
        if "skipped" in r:
            rows.append(f"{r['seq_len']:>7}{mark} {'skipped: validation split too short':>38}")
        else:
            rows.append(f"{r['seq_len']:>7}{mark} {r['windows']:>8} {r['tokens']:>9,} {r['loss']:>8.4f} "
                        f"{r['ppl']:>10.2f}")
    if trained and any(r["seq_len"] > trained for r in report["results"]):
        rows.append("* longer than any trained sequence (extrapolation)")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, RUN_DIR/checkpoints/step_NNNNNNNN or HF dir")
    p.add_argument("--data-prefix", help="PREFIX of PREFIX.bin/.idx; default: the checkpoint's training data")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--rope-scaling", default="none", choices=["none", "linear", "ntk"],
                   help="RoPE position scaling at evaluation (default none: plain extrapolation, as the paper)")
    p.add_argument("--rope-factor", type=float, default=1.0, help="scaling factor, e.g. eval length / trained length")
    p.add_argument("--tokens", type=int, help="tokens per length (default: the run's logging.eval_tokens, else "
                   f"{DEFAULT_TOKENS})")
    p.add_argument("--split", default="auto", choices=["auto", "run", "all"], help="which documents (see above)")
    p.add_argument("--valid-fraction", type=float, help="override the run's data.valid_fraction for --split run")
    add_device_arguments(p)
    p.add_argument("--tokens-per-batch", type=int, default=8192, help="tokens per forward pass (memory)")
    p.add_argument("--out", help="write the report as JSON here (checked before the work, written atomically)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.out:
            check_writable(args.out)  # before the work: a report that cannot be saved is refused, not lost
        report = evaluate(args.checkpoint, args.data_prefix, parse_lengths(args.lengths), args.rope_scaling,
                          args.rope_factor, args.tokens, args.split, args.valid_fraction, args.dtype,
                          args.tokens_per_batch, args.device)
    except (UserError, FileNotFoundError, ValueError) as e:  # model.hf: a directory without config or weights
        log.error("%s", e)
        return 2
    print(table(report))
    if args.out:
        try:
            log.info("wrote %s", write_json(args.out, report))
        except UserError as e:
            log.error("%s", e)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
