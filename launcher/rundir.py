"""The run directory besides its checkpoints: who may write it (a lock), and the copy of the tokenizer that lets
export, evaluate and resume work from any working directory and after the directory is moved.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from data_pipeline.atomic import check_dir_writable
from launcher.config import ConfigError

LOCK_FILE = ".growlength.lock"
TOKENIZER_DIR = "tokenizer"


class RunDirError(ConfigError):
    """A run directory this run cannot use; the message says why and what to do."""


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` or refuse with one line naming the place that cannot be written."""
    check_dir_writable(run_dir, "run_dir", run_dir, RunDirError)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run_dir {run_dir} cannot be created ({e.strerror}): choose a writable run_dir") from e


class RunLock:
    """An exclusive lock on a run directory, held by rank 0 for the whole run (two runs in one directory would
    overwrite each other's checkpoints and interleave metrics.jsonl). The kernel releases it when the process
    dies, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise RunDirError(f"run_dir {run_dir} is in use by a running job ({holder}); wait for it to end, "
                              f"stop it, or choose another run_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def has_previous_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run's results (checkpoints or metrics)."""
    from launcher.checkpoint import checkpoint_root
    from launcher.metrics import METRICS_FILE
    root = checkpoint_root(run_dir)
    return (run_dir / METRICS_FILE).is_file() or (root.is_dir() and any(root.iterdir()))


def move_aside(run_dir: Path, now: datetime.datetime) -> Path:
    """Rename ``run_dir`` to ``RUN_DIR.old-YYYYmmdd-HHMMSS`` (a free name) and create it again, empty; returns the
    new name of the old run."""
    stamp = now.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    try:
        run_dir.rename(aside)
        run_dir.mkdir()
    except OSError as e:
        raise RunDirError(f"run_dir {run_dir} cannot be moved aside to {aside} ({e.strerror}): move it yourself "
                          f"or choose another run_dir") from e
    return aside


def copy_tokenizer(tokenizer, run_dir: Path) -> str:
    """Write a self-contained copy of the run's tokenizer (``data_pipeline.tokenizer.Tokenizer``) into
    ``RUN_DIR/tokenizer/`` (each file under a temporary name, renamed); returns its path relative to ``run_dir``."""
    return str(Path(tokenizer.save(run_dir / TOKENIZER_DIR)).relative_to(run_dir))
