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

from slurm_jobs import (ROOT, assert_same_losses, job_info, last_step, log_of, steps, submit_training, wait_for,
                        wait_job)

from launcher import checkpoint as ckpt
from launcher.distributed import job_master_port


def test_sbatch_deepspeed_trains_tiny_plan(reference):
    run_dir, log, job = reference
    records = steps(run_dir)
    assert sorted(records) == list(range(1, 19))
    assert [(records[s]["seq_len"], records[s]["micro_batch_size"]) for s in (1, 7, 13)] == [(32, 16), (64, 8), (128, 4)]
    assert records[18]["loss"] < records[1]["loss"] - 0.3
    names = [p.name for p in ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir))]
    assert names == [ckpt.tag_for(s) for s in (4, 6, 8, 12, 16, 18)]
    hostfile = run_dir / "slurm" / f"hostfile.{job}"
    node = re.search(r"restart 0 on (\S+) \(1 node", log).group(1)
    assert hostfile.read_text() == f"{node} slots=2\n"  # from `scontrol show hostnames`, slots = ranks per node
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
    info = wait_job(slurm_env, merge_id)
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


def test_deepspeed_mode_starts_the_ranks_on_the_jobs_gpus(slurm_env, run_yaml, tmp_path):
    """A job given GPUs 3 and 5 of its node (CUDA_VISIBLE_DEVICES, as a partial-node allocation sets it) starts its
    ranks on 3 and 5, not on 0 and 1: the runner gets --include HOST:3,5 (CPU ranks here only carry the indices)."""
    job = submit_training(slurm_env, run_yaml, tmp_path / "run", tmp_path, CUDA_VISIBLE_DEVICES="3,5",
                          GPUS_PER_NODE="2")
    info = wait_job(slurm_env, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    node = re.search(r"restart 0 on (\S+) \(1 node", log).group(1)
    assert f"--include {node}:3,5 --no_ssh_check" in log
    assert "Setting CUDA_VISIBLE_DEVICES=3,5" in log  # deepspeed.launcher.launch, for the ranks it starts
    threads = int(re.search(r"master \S+, (\d+) inductor compile thread\(s\) per rank", log).group(1))
    assert threads == max(1, int(re.search(r"nproc (\d+)", log).group(1)) // 2)  # the node's CPUs shared by 2 ranks
