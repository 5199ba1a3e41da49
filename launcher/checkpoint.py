"""Checkpoint bookkeeping around DeepSpeed's own save/load: tags, completeness, resume, RNG, retention.

Layout: ``RUN_DIR/checkpoints/step_00000120/`` holds DeepSpeed's files, one ``rng_rank{R}.pt`` per rank and,
written last by rank 0 after every rank has finished, ``growlength_state.json``. That file is the completeness
marker: a directory without it (a save killed half-way) is never resumed from and is cleared before a new
save reuses its name (DESIGN.md decision 7).

The state file is one typed, versioned record, :class:`CheckpointState`: :func:`write_state` is its only writer and
:func:`read_state` its only reader (resume, the evidence tools); a file of another version or with missing or unknown
fields is refused in one line naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_pipeline.atomic import atomic_path, write_text
from data_pipeline.errors import UserError
from launcher import run_identity

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.data import TrainData
    from launcher.plan import StagePlan
    from model import ModelConfig

STATE_FILE = "growlength_state.json"
STATE_VERSION = 2  # tick when a field is added, removed or changes meaning
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message says what differs and how to proceed."""


class CheckpointSaveError(CheckpointError):
    """A save that failed on the filesystem (a full disk, a quota, a lost mount); its directory stays incomplete."""


# how torch.save reports a failed write (ENOSPC inside its zip writer arrives as a RuntimeError, not an OSError)
_WRITE_FAILURE = re.compile(r"write|iostream|No space|quota", re.IGNORECASE)


@contextlib.contextmanager
def save_errors(path: Path):
    """Turn a failed write of the checkpoint at ``path`` into one line naming it and the fix (no traceback): the
    directory has no state file, so it is never resumed from, and the previous checkpoints are untouched."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _WRITE_FAILURE.search(str(e)):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        raise CheckpointSaveError(f"checkpoint {path} could not be written ({why}); it is incomplete and will not be "
                                  f"resumed from: free space under {path.parent} (or move run_dir to a larger "
                                  f"filesystem), then resume with --resume auto from the previous checkpoint") from None


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0                 # optimizer steps completed
    tokens_seen: int = 0
    elapsed_s: float = 0.0        # training wall-clock before this process started
    stage_seconds: dict = field(default_factory=dict)  # stage index (as a string) -> wall-clock spent in it


@dataclass
class CheckpointState:
    """The launcher's record of one checkpoint (``growlength_state.json``), beside DeepSpeed's files."""

    step: int                     # optimizer steps completed
    stage: int                    # index of the stage that step belongs to
    loader: dict                  # the data loader's position (StageLoader.state_dict)
    tokens_seen: int
    elapsed_s: float              # training wall-clock up to this save
    stage_seconds: dict           # stage index (as a string) -> wall-clock spent in it
    plan: list                    # StagePlan.describe(): one dict per stage
    plan_fingerprint: str         # StagePlan.fingerprint()
    tokens_per_step: int
    world_size: int               # ranks (ZeRO shards optimizer state per rank)
    seed: int
    data_fingerprint: str         # of the training .bin/.idx files
    data_prefix: str              # as given in the config
    data_prefix_resolved: str     # absolute, at training time
    tokenizer: str                # as given
    tokenizer_resolved: str       # absolute, at training time
    tokenizer_in_run: str | None  # the run directory's copy, relative to RUN_DIR
    model: dict                   # ModelConfig.to_dict() of the built model
    config: dict                  # RunConfig.to_dict()
    files: dict = field(default_factory=dict)  # every file of the save -> bytes, checked before a resume
    sha256: dict = field(default_factory=dict)  # every file of the save -> SHA-256, checked before a resume
    version: int = STATE_VERSION

    def progress(self) -> Progress:
        return Progress(step=self.step, tokens_seen=self.tokens_seen, elapsed_s=self.elapsed_s,
                        stage_seconds=dict(self.stage_seconds))


def run_state(cfg: RunConfig, plan: StagePlan, data: TrainData, model_config: ModelConfig, progress: Progress,
              loader_state: dict, world: int) -> CheckpointState:
    """The record of this run at ``progress`` (``files`` is filled once the save's files exist)."""
    return CheckpointState(
        step=progress.step, stage=plan.stage_at(progress.step).index, loader=loader_state,
        tokens_seen=progress.tokens_seen, elapsed_s=progress.elapsed_s, stage_seconds=dict(progress.stage_seconds),
        plan=plan.describe(), plan_fingerprint=plan.fingerprint(), tokens_per_step=plan.tokens_per_step,
        world_size=world, seed=cfg.seed, data_fingerprint=data.fingerprint, data_prefix=data.prefix,
        data_prefix_resolved=str(Path(data.prefix).resolve()), tokenizer=data.tokenizer_path,
        tokenizer_resolved=str(Path(data.tokenizer_path).resolve()), tokenizer_in_run=data.tokenizer_in_run,
        model=model_config.to_dict(), config=cfg.to_dict())


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
    """Why the checkpoint at ``path`` cannot be loaded, or None. Reads the state JSON, then every file once.

    Catches what a kill, a full disk, a lost file or a flipped byte leaves: a state JSON that does not parse, and
    any file of the save (DeepSpeed's shards, RNG states) missing, of another size, or of another SHA-256 than
    when it was written."""
    state = _parse_state(path / STATE_FILE)
    if isinstance(state, str):
        return state
    for name, size in state.files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    for name, digest in state.sha256.items():
        if sha256_of(path / name) != digest:
            return f"{path / name} has another SHA-256 than when it was saved (corrupted)"
    if world_size is not None and state.world_size == world_size:
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (path / f"rng_rank{r}.pt").is_file()]
        if missing:
            return f"{path / missing[0]} is missing"
    return None


def _saved_files(path: Path) -> list[Path]:
    return [f for f in sorted(path.rglob("*")) if f.is_file() and f.name != STATE_FILE and not f.name.startswith(".")]


def file_sizes(path: Path) -> dict[str, int]:
    """Every file a save wrote (relative name -> bytes), recorded in its state so a resume can check them."""
    return {str(f.relative_to(path)): f.stat().st_size for f in _saved_files(path)}


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(path: Path) -> dict[str, str]:
    """Every file a save wrote (relative name -> SHA-256), recorded beside the sizes: a file of the right size
    whose bytes changed is caught before it is loaded."""
    return {str(f.relative_to(path)): sha256_of(f) for f in _saved_files(path)}


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


def write_state(path: Path, state: CheckpointState) -> None:
    """Write the completeness marker atomically (the last file of a checkpoint)."""
    write_text(path / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True))


_STATE_FIELDS = {f.name for f in dataclasses.fields(CheckpointState)}
_REQUIRED = {f.name for f in dataclasses.fields(CheckpointState)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _parse_state(f: Path) -> CheckpointState | str:
    """The state in file ``f``, or what is wrong with it (a line naming the file)."""
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        return f"{f} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(raw, dict):
        return f"{f} is not a growlength checkpoint state (a JSON {type(raw).__name__})"
    if raw.get("version") != STATE_VERSION:
        return (f"{f}: checkpoint state version {raw.get('version')!r}, this launcher reads version {STATE_VERSION} "
                f"(use the launcher that wrote it)")
    missing, unknown = sorted(_REQUIRED - raw.keys()), sorted(raw.keys() - _STATE_FIELDS)
    if missing or unknown:
        return (f"{f}: not a version {STATE_VERSION} checkpoint state (missing {', '.join(missing) or 'nothing'}; "
                f"unknown {', '.join(unknown) or 'nothing'})")
    return CheckpointState(**raw)


def read_state(path: Path) -> CheckpointState:
    """The state of the checkpoint at ``path``; a damaged file, another version, or missing or unknown fields raise
    :class:`CheckpointError` naming the file."""
    state = _parse_state(path / STATE_FILE)
    if isinstance(state, str):
        raise CheckpointError(f"{state}; use another checkpoint in {path.parent}")
    return state


def model_identity(state: CheckpointState) -> dict:
    """What must not change across a resume: the built model's config (but for runtime-only switches) and where
    its initial weights came from."""
    runtime = run_identity.runtime_model_fields()
    ident = {k: v for k, v in state.model.items() if k not in runtime}
    section = state.config.get("model", {})
    ident["preset"] = section.get("preset")
    ident["init_from_hf"] = section.get("init_from_hf")
    return ident


def check_compatible(saved: CheckpointState, current: CheckpointState, path: Path, force: bool) -> list[str]:
    """Differences between a checkpoint and this run (ranks, plan, data, split, seed, model); raises unless
    ``force``.

    Returns the list of differences (empty when compatible) so a forced resume can log them.
    """
    diffs = []
    if saved.world_size != current.world_size:
        diffs.append(f"world size: checkpoint {saved.world_size} ranks, this run {current.world_size} "
                     f"(ZeRO shards optimizer state per rank: resume with the same number of ranks)")
    if saved.plan_fingerprint != current.plan_fingerprint:
        old = [(s["seq_len"], s["steps"]) for s in saved.plan]
        new = [(s["seq_len"], s["steps"]) for s in current.plan]
        what = f"stages (seq_len, steps) {old} -> {new}" if old != new else \
            f"tokens_per_step {saved.tokens_per_step} -> {current.tokens_per_step} or micro-batches"
        diffs.append(f"stage plan: {what}")
    if saved.data_fingerprint != current.data_fingerprint:
        diffs.append(f"data: checkpoint was trained on {saved.data_prefix} ({saved.data_fingerprint}), this run uses "
                     f"{current.data_prefix} ({current.data_fingerprint})")
    if saved.seed != current.seed:
        diffs.append(f"seed: {saved.seed} -> {current.seed} (changes the data order; to continue this run set "
                     f"seed={saved.seed})")
    diffs += run_identity.config_differences(saved.config, current.config, skip={"seed"})  # seed: just above
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
