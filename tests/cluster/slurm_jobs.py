"""Helpers for the cluster tests: submit slurm/pretrain.sbatch, wait for jobs, read their logs and metrics."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = "slurm/pretrain.sbatch"

# the tiny plan of tests/launcher/test_pretrain.py: 3 stages x 6 steps at 1024 tokens/step, micro-batches 16, 8, 4
RUN_YAML = """\
seed: 1234
model: {{preset: tiny}}
data: {{prefix: {prefix}, tokenizer: {tokenizer}, valid_fraction: 0.1, cache_dir: {cache}}}
growlength:
  tokens_per_step: 1024
  stages: [{{seq_len: 32, tokens: 6144}}, {{seq_len: 64, tokens: 6144}}, {{seq_len: 128, tokens: 6144}}]
checkpointing: {{interval_steps: 4, keep_last: 10}}
logging: {{log_interval: 1, tensorboard: false, eval_tokens: 2048}}
"""


def sbatch(env, script, *options, export=None, args=(), log_dir):
    """Submit; returns the job id. ``export``: variables for the job (on top of this environment)."""
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/job-%j.out", *options, script, *args]
    job_env = dict(env, **(export or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env, job_id) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


# bounds on a hang, not on speed: a loaded machine makes the jobs slower, never wrong
WAIT_S = 1800


def wait_job(env, job_id, timeout=WAIT_S) -> dict:
    """Poll until the job is finished (not pending, running, completing or requeued); its scontrol record."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not finish in {timeout}s: {job_info(env, job_id)}")


def train_options():
    opts = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
            "--job-name=gl-test"]
    return opts + (["--overcommit"] if (os.cpu_count() or 1) < 2 else [])


def submit_training(slurm_env, run_yaml, run_dir, log_dir, args=(), options=None, **export):
    export = {"RUN_CONFIG": str(run_yaml), "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
              "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **export}
    return sbatch(slurm_env, PRETRAIN, *(options or train_options()), export=export, args=args, log_dir=log_dir)


def log_of(log_dir, job_id) -> str:
    return (Path(log_dir) / f"job-{job_id}.out").read_text()


def steps(run_dir) -> dict[int, dict]:
    records = [r for r in read_metrics(run_dir) if "kind" not in r]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), "a step was logged twice"
    return by_step


def last_step(run_dir) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "kind" not in r), default=0)
    except (OSError, ValueError):  # not there yet, or a line half-written
        return 0


def wait_for(predicate, what, timeout=WAIT_S, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def assert_same_losses(run_dir, reference_dir):
    got, want = steps(run_dir), steps(reference_dir)
    assert sorted(got) == sorted(want) == list(range(1, 19))
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], f"step {s}: {got[s]['loss']} != {want[s]['loss']}"
        assert got[s]["grad_norm"] == want[s]["grad_norm"], f"step {s}"
