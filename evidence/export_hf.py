"""Export a trained checkpoint to a Hugging Face directory, tokenizer included: GPTNeoXForCausalLM or LlamaForCausalLM,
by the checkpoint's model family.

    python -m evidence.export_hf --checkpoint RUN_DIR_OR_CHECKPOINT --out HF_DIR [--overwrite] [--tokenizer PATH]
        [--device auto|cpu|cuda[:N]] [--dtype fp32|bf16|fp16|auto]

The ZeRO shards are consolidated with DeepSpeed's zero_to_fp32. README.md, the model card, gets the run's training
record (evidence.model_card: the stage plan, tokens per stage and source, the schedule, the final validation
losses). --out is built beside itself and renamed into place, and --overwrite replaces only a previous export. The
weights are written in fp32 (as trained) unless --dtype says otherwise. `load_trained_model` is shared with the tools
that read checkpoints: it treats how the run executed (attention kernel, deterministic attention, activation
checkpointing) as a choice of the machine that loads it.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from pathlib import Path

from data_pipeline.atomic import atomic_dir, check_dir_writable
from data_pipeline.errors import DatasetError, UserError
from data_pipeline.tokenizer import Tokenizer
from launcher import checkpoint as ckpt
from evidence.model_card import training_record
from evidence.runs import EvidenceError, compute_device, find_tokenizer, run_dir_of
from model import CausalLM, ModelConfig

log = logging.getLogger("growlength")


def find_checkpoint(path: str | Path) -> tuple[Path, ckpt.CheckpointState]:
    """``(checkpoint dir, its growlength state)`` for a run directory, its checkpoints/ or one checkpoint (the newest
    complete one when several); cheap: reads only the state JSON."""
    found = ckpt.resolve_resume(str(path), str(path))
    if found is None:
        raise ckpt.CheckpointError(f"--checkpoint {path}: no complete checkpoint found; give a RUN_DIR, "
                                   f"RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_NNNNNNNN")
    return found, ckpt.read_state(found)


# how the run executed, not what its weights mean: a checkpoint loads anywhere (one saved with attention: flash on a
# machine without flash-attn), and the kernels are chosen for the device it is loaded on
RUNTIME_ON_LOAD = {"attention": "auto", "deterministic_attention": False, "activation_checkpointing": False}


def load_trained_model(path: str | Path) -> tuple[CausalLM, ckpt.CheckpointState, Path]:
    """``(model in fp32 on the CPU, the checkpoint's growlength state, checkpoint dir)`` for a run directory, its
    checkpoints directory or one checkpoint; the newest complete checkpoint when several."""
    from launcher import engine as ds  # DeepSpeed lives there

    found, state = find_checkpoint(path)
    config = ModelConfig(**{**state.model, **RUNTIME_ON_LOAD})
    model = CausalLM(config)
    try:
        sd = ds.consolidated_fp32_state_dict(str(found.parent), found.name)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ckpt.CheckpointError(f"{found}: the DeepSpeed model or optimizer files cannot be read "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use an "
                                   f"earlier checkpoint of {found.parent}") from None
    try:
        model.load_weights(sd, f"{found} (its saved model config)")
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    return model.float().eval(), state, found


def check_out(out_path: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that would destroy the run or something that is not a previous export."""
    out, run = out_path.resolve(), run_dir.resolve()
    if out == run or run in out.parents or out in run.parents:
        where = "is" if out == run else "is inside" if run in out.parents else "contains"
        raise EvidenceError(f"--out {out_path} {where} the run directory {run} being exported; write the export "
                            f"elsewhere, e.g. --out {run.parent / (run.name + '-hf')}")
    if not out_path.exists():
        return
    if not out_path.is_dir():
        raise EvidenceError(f"--out {out_path} is a file, not a directory; choose another --out")
    if any(out_path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out {out_path} exists and is not empty; choose another directory or pass "
                                  f"--overwrite")
        if not (out_path / "config.json").is_file():
            raise EvidenceError(f"--out {out_path} holds no config.json, so it is not a previous export; "
                                f"--overwrite replaces only an export: choose another directory")


def export(checkpoint: str, out: str, overwrite: bool = False, tokenizer: str | None = None,
           device: str = "auto", dtype: str = "fp32") -> Path:
    """Write the HF directory at ``out`` (complete or absent: built beside it and renamed), its weights in ``dtype``
    (default fp32: the master weights as trained), the model built on ``device``."""
    from model.hf import save_hf

    where, weights_dtype = compute_device(device, dtype)
    out_path = Path(out)
    found, state = find_checkpoint(checkpoint)
    check_out(out_path, run_dir_of(found), overwrite)
    tokenizer_path = find_tokenizer(state, found, tokenizer)
    try:
        tok = Tokenizer(tokenizer_path) if tokenizer_path else None
    except DatasetError as e:
        raise DatasetError(f"{found}: the tokenizer this run trained with does not open ({e})") from None
    check_tokenizer_fits(tok, state, found)
    check_dir_writable(out_path.parent, "--out", out, EvidenceError)
    model, state, found = load_trained_model(found)
    model = model.to(device=where, dtype=weights_dtype)
    with atomic_dir(out_path) as tmp:
        save_hf(model, tmp, dtype=weights_dtype)
        if tok is not None:
            write_tokenizer(tok, tmp)
        card = tmp / "README.md"  # model/hf.py's card (the model), then the run's training record
        card.write_text(card.read_text() + training_record(state, run_dir_of(found), found), encoding="utf-8")
    log.info("exported %s (step %d, %s tokens) to %s", found, state.step, f"{state.tokens_seen:,}", out_path)
    return out_path


def check_tokenizer_fits(tok: Tokenizer | None, state: ckpt.CheckpointState, found: Path) -> None:
    """Before any work: refuse shipping a tokenizer whose ids the model has no embedding for (transformers would fail
    at the first forward) or that has no Hugging Face form (a sentencepiece unigram model)."""
    if tok is None:
        return
    if tok.kind == "sentencepiece":
        from model.hf import check_exportable_tokenizer
        try:
            check_exportable_tokenizer(tok.path)
        except ValueError as e:
            raise EvidenceError(f"{e}; nothing exported (train tokenizers meant for export with --model-type "
                                f"bpe)") from None
    vocab = int(state.model["vocab_size"])
    if tok.vocab_size > vocab:
        raise EvidenceError(f"--tokenizer {tok.path}: {tok.vocab_size:,} ids but the model of {found} has "
                            f"{vocab:,} (its embedding rows); ship the tokenizer the run trained with (leave "
                            f"--tokenizer out)")


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The run's tokenizer as Hugging Face files in ``out`` (a sentencepiece model converted to tokenizer.json, an
    HF tokenizer copied) and its special ids in ``out/config.json``, so ``AutoTokenizer.from_pretrained(out)`` gives
    the ids the model was trained on and generation stops at the EOD the data used."""
    from model.hf import save_tokenizer

    if tokenizer.kind == "sentencepiece":
        save_tokenizer(tokenizer.path, out)
    else:
        tokenizer.save(out)
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or one step_NNNNNNNN")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out")
    p.add_argument("--tokenizer", help="the tokenizer to ship (default: the run's copy, else the recorded path)")
    p.add_argument("--device", default="auto", help="where the model is built: auto (CUDA when usable) | cpu | "
                                                    "cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", help="dtype of the written weights: fp32 (default: as trained) | bf16 "
                                                   "(half the size) | fp16 | auto (bf16 on CUDA)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export(args.checkpoint, args.out, args.overwrite, args.tokenizer, args.device, args.dtype)
    except (UserError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("--out %s: cannot write the export (%s); nothing was replaced", args.out, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
