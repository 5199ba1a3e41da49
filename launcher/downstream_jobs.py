"""Downstream evaluation at stage ends (``logging.downstream_tasks``), in the background of training.

After the checkpoint at a stage's end is saved, rank 0 starts ``python -m evidence.downstream`` on it as a separate
process (the training path imports nothing from evidence) and goes on training; its output goes to
RUN_DIR/downstream/step_NNNNNNNN.log, its reports beside it. A checkpoint whose evaluation still runs is not pruned.
When training ends normally the launcher waits for the jobs still running; on a stop (preemption, an error) it
ends them, since the harness is cheap to run again by hand.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("growlength")
ROOT = Path(__file__).resolve().parents[1]


class DownstreamJobs:
    """Background `evidence.downstream` processes, one per stage-end checkpoint (rank 0 only)."""

    COMMAND = (sys.executable, "-m", "evidence.downstream")

    def __init__(self, run_dir: str | Path, tasks: list[str], limit: float | None, enabled: bool):
        self.run_dir = Path(run_dir)
        self.tasks, self.limit = tasks, limit
        self.enabled = enabled and bool(tasks)
        self.jobs: dict[Path, subprocess.Popen] = {}

    def start(self, checkpoint: Path, step: int) -> None:
        if not self.enabled:
            return
        out = self.run_dir / "downstream"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [*self.COMMAND, "--checkpoint", str(checkpoint), "--tasks",
               ",".join(self.tasks), "--out", str(out / f"step_{step:08d}")]
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        # on the CPU, so that it never takes memory or time from training on the GPU
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # not a rank of this job
        with open(out / f"step_{step:08d}.log", "w") as log_file:
            self.jobs[checkpoint] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                                     stdin=subprocess.DEVNULL)
        log.info("downstream evaluation of step %d started in the background (pid %d, log %s)", step,
                 self.jobs[checkpoint].pid, out / f"step_{step:08d}.log")

    def busy(self) -> set[Path]:
        """Checkpoints whose evaluation still runs (kept from pruning); reports the ones that ended."""
        for checkpoint, proc in list(self.jobs.items()):
            if proc.poll() is not None:
                self._ended(checkpoint, proc)
        return set(self.jobs)

    def _ended(self, checkpoint: Path, proc: subprocess.Popen) -> None:
        del self.jobs[checkpoint]
        if proc.returncode == 0:
            log.info("downstream evaluation of %s finished", checkpoint.name)
        else:
            log.warning("downstream evaluation of %s failed (exit %d); see %s", checkpoint.name, proc.returncode,
                        self.run_dir / "downstream" / f"{checkpoint.name}.log")

    def close(self, wait: bool) -> None:
        for checkpoint, proc in list(self.jobs.items()):
            if wait:
                log.info("waiting for the downstream evaluation of %s (pid %d)", checkpoint.name, proc.pid)
            else:
                proc.terminate()
            proc.wait()
            self._ended(checkpoint, proc)
