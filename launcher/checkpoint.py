"""Checkpoint bookkeeping around DeepSpeed's own save/load: tags, completeness, resume, RNG, retention.

Layout: ``RUN_DIR/checkpoints/step_00000120/`` holds DeepSpeed's files, one ``rng_rank{R}.pt`` per rank and,
written last by rank 0 after every rank has finished, ``growlength_state.json``. That file is the completeness
marker: a directory without it (a save killed half-way) is never resumed from and is cleared before a new
save reuses its name (DESIGN.md decision 7).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from data_pipeline.atomic import atomic_path, write_text

STATE_FILE = "growlength_state.json"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what differs and how to proceed."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def problem(path: Path, world_size: int | None = None) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None. Cheap: reads only the state JSON and file sizes.

    Catches what a kill, a full disk or a lost file leaves: a state JSON that does not parse, and any file of the
    save (DeepSpeed's shards, RNG states) missing or of another size than when it was written."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{path / STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{path / STATE_FILE} is not a growlength checkpoint state"
    for name, size in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    if world_size is not None and state.get("world_size") == world_size:
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (path / f"rng_rank{r}.pt").is_file()]
        if missing:
            return f"{path / missing[0]} is missing"
    return None


def file_sizes(path: Path) -> dict[str, int]:
    """Every file a save wrote (relative name -> bytes), recorded in its state so a resume can check them."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != STATE_FILE and not f.name.startswith(".")}


def choose(resume: str, run_dir: str | Path, world_size: int | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and the warnings to log (rank 0 decides; the others take its answer).

    ``auto`` takes the newest complete checkpoint that passes :func:`problem`, skipping damaged ones with a
    warning each (an older complete checkpoint is better than none); an explicit path must pass as it is."""
    warnings = []
    if resume == "auto":
        for path in reversed(complete_checkpoints(checkpoint_root(run_dir))):
            why = problem(path, world_size)
            if why is None:
                return path, warnings
            warnings.append(f"skipping checkpoint {path.name}: {why}; resuming from an older one")
        return None, warnings
    path = resolve_resume(resume, run_dir)
    if path is not None:
        why = problem(path, world_size)
        if why is not None:
            raise CheckpointError(f"--resume {resume}: {why}; resume from an earlier checkpoint in "
                                  f"{path.parent} (or --resume auto, which skips damaged ones)")
    return path, warnings


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from: ``auto`` = newest complete one (or None), ``none``, or a path
    to a checkpoint directory (or a run directory / checkpoints directory holding some)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(run_dir))
        return found[-1] if found else None
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p, checkpoint_root(p)):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    if p.is_dir() and _TAG.match(p.name):
        raise CheckpointError(f"--resume {resume}: this checkpoint is incomplete (no {STATE_FILE}; its save was "
                              f"interrupted); resume from an earlier one in {p.parent}")
    raise CheckpointError(f"--resume {resume}: not a checkpoint (no {STATE_FILE}) and no complete checkpoint "
                          f"below it; give a RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_NNNNNNNN")


def prepare_dir(root: Path, tag: str, rank: int) -> None:
    """Rank 0 clears a leftover incomplete directory of the same name (call a barrier after)."""
    path = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists() and not (path / STATE_FILE).is_file():
            shutil.rmtree(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(path: Path, rank: int) -> None:
    with atomic_path(path / f"rng_rank{rank}.pt") as tmp:
        torch.save(rng_state(), tmp)


def load_rng(path: Path, rank: int) -> None:
    f = path / f"rng_rank{rank}.pt"
    if not f.is_file():
        raise CheckpointError(f"{path}: no RNG state for rank {rank} ({f.name}); was it saved with fewer ranks?")
    set_rng_state(torch.load(f, weights_only=False))


def write_state(path: Path, state: dict) -> None:
    """Write the completeness marker atomically (the last file of a checkpoint)."""
    write_text(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def read_state(path: Path) -> dict:
    """The state JSON of a checkpoint; a damaged one raises :class:`CheckpointError` naming the file."""
    f = path / STATE_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable ({type(e).__name__}: {e}); resume from another checkpoint "
                              f"in {path.parent}") from e


# ModelConfig fields that change how a run executes, not what the weights mean
_RUNTIME_MODEL_KEYS = {"attention", "deterministic_attention", "activation_checkpointing", "rope_scaling",
                       "rope_scaling_factor"}


def model_identity(state: dict) -> dict:
    """What must not change across a resume: the built model's config (but for runtime-only switches) and where
    its initial weights came from."""
    ident = {k: v for k, v in state.get("model", {}).items() if k not in _RUNTIME_MODEL_KEYS}
    section = state.get("config", {}).get("model", {})
    ident["preset"] = section.get("preset")
    ident["init_from_hf"] = section.get("init_from_hf")
    return ident


def check_compatible(saved: dict, current: dict, path: Path, force: bool) -> list[str]:
    """Differences between a checkpoint and this run (ranks, plan, data, split, seed, model); raises unless
    ``force``.

    Returns the list of differences (empty when compatible) so a forced resume can log them.
    """
    diffs = []
    if saved["world_size"] != current["world_size"]:
        diffs.append(f"world size: checkpoint {saved['world_size']} ranks, this run {current['world_size']} "
                     f"(ZeRO shards optimizer state per rank: resume with the same number of ranks)")
    if saved["plan_fingerprint"] != current["plan_fingerprint"]:
        old = [(s["seq_len"], s["steps"]) for s in saved["plan"]]
        new = [(s["seq_len"], s["steps"]) for s in current["plan"]]
        what = f"stages (seq_len, steps) {old} -> {new}" if old != new else \
            f"tokens_per_step {saved['tokens_per_step']} -> {current['tokens_per_step']} or micro-batches"
        diffs.append(f"stage plan: {what}")
    if saved["data_fingerprint"] != current["data_fingerprint"]:
        diffs.append(f"data: checkpoint was trained on {saved.get('data_prefix')} "
                     f"({saved['data_fingerprint']}), this run uses {current.get('data_prefix')} "
                     f"({current['data_fingerprint']})")
    if saved.get("seed") != current.get("seed"):
        diffs.append(f"seed: {saved.get('seed')} -> {current.get('seed')} (changes the data order)")
    for key, why in (("valid_fraction", "changes which documents train"), ("epochs", "changes the data order")):
        old = saved.get("config", {}).get("data", {}).get(key)
        new = current.get("config", {}).get("data", {}).get(key)
        if old != new:
            diffs.append(f"data.{key}: {old!r} -> {new!r} ({why})")
    old_model, new_model = model_identity(saved), model_identity(current)
    changed = sorted(k for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k))
    if changed:
        diffs.append("model: " + ", ".join(f"{k} {old_model.get(k)!r} -> {new_model.get(k)!r}" for k in changed)
                     + " (the weights would not fit, or would mean something else)")
    if diffs and not force:
        raise CheckpointError(f"cannot resume from {path}: it differs from this run in\n  " + "\n  ".join(diffs)
                              + "\nstart a new run_dir, restore the old settings, or pass "
                                "--resume-force (checkpointing.resume_force=true) to continue anyway")
    return diffs


def prune(root: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (rank 0 only), and never those in ``keep``
    (still read by a background job)."""
    for old in complete_checkpoints(root)[:-keep_last]:
        if old in keep:
            continue
        (old / STATE_FILE).unlink()  # first: an interrupted deletion leaves an incomplete dir, never a bad one
        shutil.rmtree(old)
