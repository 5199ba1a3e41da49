"""slurm/*.sbatch on a real one-node SLURM cluster, 2 CPU ranks on gloo: the tiny GrowLength plan trained by sbatch
(deepspeed runner with a hostfile from the allocation, and srun), preempted by SLURM's early-warning signal and by
`scontrol requeue` and resumed exactly; mpirun; sharded preprocessing as a job array + merge; bad input."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import checkpoint as ckpt
from launcher.engine import job_master_port
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


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, tokenized, sp_model):
    d = tmp_path_factory.mktemp("cluster")
    path = d / "tiny.yaml"
    path.write_text(RUN_YAML.format(prefix=tokenized, tokenizer=sp_model, cache=d / "index-cache"))
    return path


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


def wait_job(env, job_id, timeout=240) -> dict:
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


def submit_training(slurm_env, run_yaml, run_dir, log_dir, args=(), **export):
    export = {"RUN_CONFIG": str(run_yaml), "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
              "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **export}
    return sbatch(slurm_env, PRETRAIN, *train_options(), export=export, args=args, log_dir=log_dir)


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


def wait_for(predicate, what, timeout=180, every=0.05):
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


@pytest.fixture(scope="module")
def reference(slurm_env, run_yaml, tmp_path_factory):
    """`sbatch slurm/pretrain.sbatch` with 2 tasks, deepspeed mode, run to the end: (run_dir, log, job id)."""
    d = tmp_path_factory.mktemp("reference")
    job = submit_training(slurm_env, run_yaml, d / "run", d)
    info = wait_job(slurm_env, job)
    log = log_of(d, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    return d / "run", log, job


def test_sbatch_deepspeed_trains_tiny_plan(reference):
    run_dir, log, job = reference
    records = steps(run_dir)
    assert sorted(records) == list(range(1, 19))
    assert [(records[s]["seq_len"], records[s]["micro_batch_size"]) for s in (1, 7, 13)] == [(32, 16), (64, 8), (128, 4)]
    assert records[18]["loss"] < records[1]["loss"] - 0.3
    names = [p.name for p in ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir))]
    assert names == [ckpt.tag_for(s) for s in (4, 6, 8, 12, 16, 18)]
    hostfile = run_dir / "slurm" / f"hostfile.{job}"
    assert hostfile.read_text() == "localhost slots=2\n"  # from `scontrol show hostnames`, slots = ranks per node
    port = job_master_port(job)
    assert f"deepspeed --hostfile {hostfile} --no_ssh_check --master_addr 127.0.0.1 --master_port {port}" in log
    assert "2 rank(s) = 1 node(s) x 2" in log and "new run in" in log and "training complete" in log
    assert "done: 18 steps, 18,432 tokens" in log


def test_preempted_by_signal_and_by_scontrol_requeue_resumes_exactly(slurm_env, run_yaml, reference, tmp_path):
    """The early-warning USR1 to the batch script (what --signal=B:USR1@N delivers) mid-stage 0: checkpoint, self-
    requeue, resume; then `scontrol requeue` mid-run: SLURM's TERM, checkpoint, resume; every step once, same losses."""
    run_dir = tmp_path / "run"
    job = submit_training(slurm_env, run_yaml, run_dir, tmp_path)
    wait_for(lambda: last_step(run_dir) >= 2, "step 2")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    wait_for(lambda: "restart 1 " in log_of(tmp_path, job) and last_step(run_dir) >= 8,
             "the requeued job to pass step 8")
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    info = wait_job(slurm_env, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-5000:]
    assert "got SIGUSR1" in log and "preempted (SIGUSR1, launcher exit 75): requeueing job" in log
    assert "got SIGTERM" in log and "SLURM is requeueing this job itself" in log
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) at step", log)]
    assert len(resumed) == 2 and 2 < resumed[0] < 8 < resumed[1] < 18, resumed  # both mid-run, after the signal
    assert "restart 2 " in log and "training complete" in log
    assert_same_losses(run_dir, reference[0])


def test_srun_launch_matches_deepspeed(slurm_env, run_yaml, reference, tmp_path):
    """LAUNCH=srun: one task per rank; the launcher takes rank, world and master from SLURM_*."""
    job = submit_training(slurm_env, run_yaml, tmp_path / "run", tmp_path, LAUNCH="srun")
    info = wait_job(slurm_env, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-5000:]
    assert "srun --nodes=1 --ntasks=2 --ntasks-per-node=2" in log and "on 2 rank(s)" in log
    assert_same_losses(tmp_path / "run", reference[0])


def test_mpirun_matches_deepspeed(mpirun, run_yaml, reference, tmp_path):
    """mpirun -np 2 python launcher/pretrain.py: ranks from OMPI_COMM_WORLD_*, no deepspeed runner, no SLURM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GROWLENGTH_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
    cmd = [mpirun, "-np", "2", "--oversubscribe", "-x", "GLOO_SOCKET_IFNAME", "-x", "OMP_NUM_THREADS", sys.executable,
           "launcher/pretrain.py", "--ds_config", "ds_configs/zero2.json", "--config", str(run_yaml),
           "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "on 2 rank(s)" in proc.stdout
    assert_same_losses(tmp_path / "run", reference[0])


def test_preprocess_array_then_merge_equals_single_process(slurm_env, corpus_jsonl, sp_model, tokenized, tmp_path):
    """3 shards -> a 3-task job array -> a dependent merge: byte for byte the single-process dataset."""
    lines = Path(corpus_jsonl).read_text(encoding="utf-8").splitlines(keepends=True)
    cuts = [0, len(lines) // 3, 2 * len(lines) // 3, len(lines)]
    shards = []
    for i in range(3):
        shard = tmp_path / f"part-{i}.jsonl"
        shard.write_text("".join(lines[cuts[i]:cuts[i + 1]]), encoding="utf-8")
        shards.append(str(shard))
    prefix = tmp_path / "out" / "corpus"
    proc = subprocess.run(["bash", "slurm/preprocess_submit.sh", "--output-prefix", str(prefix), "--tokenizer-model",
                           sp_model, "--cpus-per-task=1", f"--output={tmp_path}/pp-%A_%a.out", "--", *shards],
                          cwd=ROOT, env=dict(slurm_env, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = proc.stdout.split()
    assert job_info(slurm_env, merge_id)["Dependency"] == f"afterok:{array_id}_*(unfulfilled)" or \
        job_info(slurm_env, merge_id)["JobState"] in ("RUNNING", "COMPLETED", "COMPLETING")
    info = wait_job(slurm_env, merge_id, timeout=120)
    assert info["JobState"] == "COMPLETED", "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    for ext in (".bin", ".idx"):
        assert Path(f"{prefix}{ext}").read_bytes() == Path(f"{tokenized}{ext}").read_bytes(), ext
    assert len(list((tmp_path / "out" / "corpus.shards").glob("shard_*.bin"))) == 3


# ---- bad input: a clear error in the job log, the job failed, never requeued ---------------------------------------
def assert_failed_for_good(slurm_env, job, exit_code):
    info = wait_job(slurm_env, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{exit_code}:0", info
    time.sleep(3)  # a self-requeue would show up by now
    again = job_info(slurm_env, job)
    assert again["JobState"] == "FAILED" and again["Restarts"] == "0", again


def test_gpus_asked_but_allocation_has_none(slurm_env, run_yaml, tmp_path):
    job = submit_training(slurm_env, run_yaml, tmp_path / "run", tmp_path, GPUS_PER_NODE="2")
    assert_failed_for_good(slurm_env, job, 1)
    log = log_of(tmp_path, job)
    assert "ERROR: asked for 2 GPU(s) per node but this allocation shows 0" in log
    assert "GPUS_PER_NODE=0" in log and "deepspeed" not in log.split("ERROR")[1]


def test_run_dir_not_writable(slurm_env, run_yaml, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a run dir below a regular file cannot be created, even by root
    job = submit_training(slurm_env, run_yaml, blocker / "run", tmp_path)
    assert_failed_for_good(slurm_env, job, 1)
    assert f"ERROR: RUN_DIR={blocker}/run is not writable" in log_of(tmp_path, job)


def test_requeue_onto_incompatible_checkpoint_fails_loudly(slurm_env, run_yaml, reference, tmp_path):
    """A job whose run dir holds a checkpoint of another plan: launcher exit 2, job FAILED, no self-requeue."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    job = submit_training(slurm_env, run_yaml, run_dir, tmp_path, args=["growlength.tokens_per_step=2048"])
    assert_failed_for_good(slurm_env, job, 2)
    log = log_of(tmp_path, job)
    assert "resuming from" in log and "cannot resume from" in log and "stage plan:" in log
    assert "the launcher refused its input (exit 2" in log and "not requeueing" in log
    assert steps(run_dir) == steps(reference[0])  # nothing of the old run was touched


def test_empty_run_config_means_the_builtin_demo(slurm_env, tmp_path):
    """RUN_CONFIG="" is documented as the built-in tiny demo: no --config reaches the launcher (an unset one means
    the 160M preset), and the job trains the built-in corpus."""
    run_dir = tmp_path / "run"
    job = submit_training(slurm_env, "", run_dir, tmp_path, args=[
        "growlength.tokens_per_step=4096", "growlength.stages=[{seq_len: 64, tokens: 8192}]",
        "logging.tensorboard=false", "data.valid_fraction=0.05"], RUN_CONFIG="")
    info = wait_job(slurm_env, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    command = next(line for line in log.splitlines() if "launcher/pretrain.py" in line and "pretrain.sbatch" in line)
    assert "--config" not in command
    assert [(r["seq_len"], r["step"]) for r in steps(run_dir).values()] == [(64, 1), (64, 2)]
    assert "model tiny:" in log
