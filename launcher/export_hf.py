"""Export a trained checkpoint to a Hugging Face directory (tokenizer included): GPTNeoXForCausalLM or
LlamaForCausalLM, by the family of the checkpoint's model.

    python -m launcher.export_hf --checkpoint RUN_DIR_OR_CHECKPOINT --out HF_DIR

The ZeRO shards are consolidated into one fp32 state dict with DeepSpeed's own zero_to_fp32 utilities; the
model's converter writes config, weights and tokenizer. ``load_trained_model`` is shared with the other tools
(evaluate, plot) that read checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from launcher import checkpoint as ckpt
from model import CausalLM, ModelConfig

log = logging.getLogger("growlength")


def load_trained_model(path: str | Path) -> tuple[CausalLM, dict, Path]:
    """``(model in fp32 on the CPU, the checkpoint's growlength state, checkpoint dir)`` for a run directory, its
    checkpoints directory or one checkpoint; the newest complete checkpoint when several."""
    from launcher import engine as ds  # DeepSpeed lives there

    found = ckpt.resolve_resume(str(path), str(path))
    state = ckpt.read_state(found)
    config = ModelConfig(**state["model"])
    model = CausalLM(config)
    sd = ds.consolidated_fp32_state_dict(str(found.parent), found.name)
    try:
        model.load_weights(sd, f"{found} (its saved model config)")
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None
    return model.float().eval(), state, found


def export(checkpoint: str, out: str, overwrite: bool = False) -> Path:
    """Write the HF directory at ``out`` (complete or absent: built beside it and renamed)."""
    from model.hf import save_hf

    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    model, state, found = load_trained_model(checkpoint)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        save_hf(model, tmp, tokenizer_model_path=state.get("tokenizer"))
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (step %d, %s tokens) to %s", found, state["step"], f"{state['tokens_seen']:,}", out_path)
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory, its checkpoints/ or one step_NNNNNNNN")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export(args.checkpoint, args.out, args.overwrite)
    except (ckpt.CheckpointError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
