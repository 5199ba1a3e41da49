"""Start-up around the loop: logging, rank 0's decision (the run directory's lock and the checkpoint to resume
from, taken by every rank), the checks that must fail before anything expensive is built (probe caps, validation
lengths), and loading the chosen checkpoint into the engine.

A user error found here is a ``UserError``: ``main`` logs it in one line and exits 2.
"""
from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path
from typing import Callable

from data_pipeline.errors import DatasetError, SamplePlanError, UserError
from launcher import checkpoint as ckpt
from launcher import distributed as dist
from launcher import engine as ds
from launcher import rundir
from launcher.config import ConfigError, RunConfig
from launcher.data import TrainData
from launcher.metrics import truncate_after
from launcher.plan import PlanError, StagePlan, max_tokens_per_micro_batch

log = logging.getLogger("growlength")


class StartupError(UserError):
    """A user error found by rank 0 during start-up, raised on every rank (its message is rank 0's)."""


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def resume(cfg: RunConfig, engine, saved: ckpt.CheckpointState, path: Path, rank: int) -> ckpt.Progress:
    ds.load_checkpoint(engine, str(path.parent), path.name)
    ckpt.load_rng(path, rank)
    if rank == 0:
        dropped = truncate_after(cfg.run_dir, saved.step)
        if dropped:
            log.info("dropped %d metrics records written after the checkpoint", dropped)
    return saved.progress()


def probed_caps(cfg: RunConfig) -> list[int] | None:
    """Per-stage micro-batch token caps from a bench_lengths memory probe, when the config names one."""
    probe = cfg.growlength.micro_batch_probe
    if not probe:
        return None
    if not Path(probe).is_file():
        raise ConfigError(f"growlength.micro_batch_probe {probe}: no such file; make one with "
                          f"python -m evidence.bench_lengths --json {probe}")
    try:
        return [max_tokens_per_micro_batch(probe, int(s["seq_len"])) for s in cfg.growlength.stages]
    except PlanError as e:
        raise ConfigError(f"growlength.micro_batch_probe {probe}: {e}") from e


def claim_run_dir(cfg: RunConfig, run_dir: Path, world: int,
                  now: Callable[[], datetime.datetime] = datetime.datetime.now
                  ) -> tuple[rundir.RunLock, Path | None, list[str]]:
    """Rank 0's part of start-up: lock the run directory and choose the checkpoint to resume from.

    A run directory belongs to one run: a start that would write a second run into it (``--resume none``, another
    run's checkpoint, or a fresh start where every checkpoint is damaged) is refused, unless
    ``checkpointing.start_over`` moves the old run aside first."""
    lock = rundir.RunLock(run_dir)
    try:
        warnings = []
        if cfg.checkpointing.start_over and rundir.has_previous_run(run_dir):
            aside = rundir.move_aside(run_dir, now())
            lock.release()
            lock = rundir.RunLock(run_dir)
            warnings.append(f"--start-over: the previous run of {run_dir} was moved aside to {aside}")
        resume = cfg.checkpointing.resume
        previous = rundir.has_previous_run(run_dir)
        fix = f"choose another run_dir, or pass --start-over (checkpointing.start_over=true) to move {run_dir} aside"
        if resume == "none" and previous:
            raise rundir.RunDirError(f"--resume none, but run_dir {run_dir} already holds a run (checkpoints or "
                                     f"metrics.jsonl) that this one would overwrite: resume it (--resume auto) or "
                                     f"{fix}")
        path, skipped = ckpt.choose(resume, run_dir, world)
        root = ckpt.checkpoint_root(run_dir).resolve()
        if path is not None and previous and path.resolve().parent != root:
            raise rundir.RunDirError(f"--resume {resume} continues another run, but run_dir {run_dir} holds a run of "
                                     f"its own, whose checkpoints and metrics this one would overwrite: {fix}")
        if path is None and skipped and previous:
            newest = ckpt.complete_checkpoints(root)[-1]
            raise rundir.RunDirError(f"every checkpoint of run_dir {run_dir} is damaged ({len(skipped)}; the newest: "
                                     f"{ckpt.problem(newest, world)}); starting "
                                     f"again from step 1 would append a second run to its metrics: {fix}, or "
                                     f"resume an earlier copy with --resume PATH")
        return lock, path, warnings + skipped
    except BaseException:
        lock.release()
        raise


def check_validation(data: TrainData, plan: StagePlan, cfg: RunConfig) -> None:
    """Every length the loop will validate at fits the validation split: found now, not at the first stage end."""
    if not data.has_validation:
        return
    for length in sorted({s.seq_len for s in plan.stages} | set(cfg.logging.eval_lengths)):
        try:
            data.samples.validation.windows(length, 1)
        except (DatasetError, SamplePlanError) as e:
            where = "logging.eval_lengths" if length in cfg.logging.eval_lengths else "a stage's seq_len"
            raise DatasetError(f"{where} {length}: {e}") from e


def start_decision(cfg: RunConfig, run_dir: Path, rank: int, world: int) -> tuple[rundir.RunLock | None, dict]:
    """Rank 0 locks the run directory and chooses the checkpoint; every rank takes its answer (ranks listing a
    shared filesystem could disagree), and a refusal on rank 0 is raised on every rank instead of leaving the others
    waiting at the next collective. Returns rank 0's lock (None elsewhere) and ``{"path", "warnings"}``."""
    lock, decision = None, {"error": None, "path": None, "warnings": []}
    if rank == 0:
        try:
            rundir.check_writable(run_dir)
            lock, path, warnings = claim_run_dir(cfg, run_dir, world)
            decision.update(path=str(path) if path else None, warnings=warnings)
        except UserError as e:
            decision["error"] = f"{type(e).__name__}: {e}"
    decision = dist.broadcast_object(decision)
    if decision["error"]:
        if lock is not None:
            lock.release()
        raise StartupError(decision["error"])
    return lock, decision
