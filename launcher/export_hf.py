"""Export a trained checkpoint to a Hugging Face GPTNeoXForCausalLM directory (tokenizer included).

    python -m launcher.export_hf --checkpoint RUN_DIR_OR_CHECKPOINT --out HF_DIR

The ZeRO shards are consolidated into one fp32 state dict with DeepSpeed's own zero_to_fp32 utilities; the
model's converter writes config, weights and tokenizer. ``load_trained_model`` is shared with the other tools
(evaluate, plot) that read checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from data_pipeline.errors import DatasetError
from data_pipeline.tokenizer import Tokenizer
from launcher import checkpoint as ckpt
from model import GPTNeoX, ModelConfig

log = logging.getLogger("growlength")


def load_trained_model(path: str | Path) -> tuple[GPTNeoX, dict, Path]:
    """``(model in fp32 on the CPU, the checkpoint's growlength state, checkpoint dir)`` for a run directory, its
    checkpoints directory or one checkpoint; the newest complete checkpoint when several."""
    from launcher import engine as ds  # DeepSpeed lives there

    found = ckpt.resolve_resume(str(path), str(path))
    state = ckpt.read_state(found)
    config = ModelConfig(**state["model"])
    model = GPTNeoX(config)
    sd = ds.consolidated_fp32_state_dict(str(found.parent), found.name)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{found}: weights do not match the saved model config "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.float().eval(), state, found


def export(checkpoint: str, out: str, overwrite: bool = False) -> Path:
    """Write the HF directory at ``out`` (complete or absent: built beside it and renamed)."""
    from model.hf import save_hf

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    model, state, found = load_trained_model(checkpoint)
    try:
        tokenizer = Tokenizer(state["tokenizer"]) if state.get("tokenizer") else None
    except DatasetError as e:
        raise DatasetError(f"{found}: the tokenizer this run trained with does not open ({e})") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        save_hf(model, tmp)
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d, %s tokens) to %s", found, state["step"], f"{state['tokens_seen']:,}", out_path)
    return out_path


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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export(args.checkpoint, args.out, args.overwrite)
    except (ckpt.CheckpointError, FileExistsError, DatasetError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
