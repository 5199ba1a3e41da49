"""Two nodes on one machine: growlength-node1/2 at 127.0.0.1/127.0.0.2, a slurmd each, an sshd on both addresses
(slurm/setup_local_cluster.sh). `sbatch --nodes=2` with one CPU rank per node, in the default mode (srun) and with the
deepspeed runner over pdsh + ssh: the run trains, SLURM's early-warning USR1 makes every rank checkpoint and exit 75,
the job requeues itself, and the resumed run's losses equal the uninterrupted (one-node, two-rank) reference's."""
import os
import re
import subprocess
from pathlib import Path

import pytest
from slurm_jobs import assert_same_losses, job_info, last_step, log_of, submit_training, wait_for, wait_job

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
             "--job-name=gl-2nodes"]


@pytest.fixture(scope="module")
def two_nodes(slurm_env):
    """The job environment for two-node jobs: a cluster with two idle nodes and ssh to them (pdsh's variable)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm_env, capture_output=True, text=True,
                         timeout=20).stdout.split("\n")
    idle = sorted({line.split()[0] for line in out if line.endswith(" idle")})
    if len(idle) < 2:
        pytest.skip(f"two idle nodes needed, found {idle}: restart slurm/setup_local_cluster.sh (two slurmd)")
    ssh_config = Path(slurm_env["SLURM_CONF"]).parent / "ssh" / "ssh_config"
    if not ssh_config.is_file():
        pytest.skip(f"{ssh_config} missing: slurm/setup_local_cluster.sh starts the loopback sshd")
    return dict(slurm_env, PDSH_SSH_ARGS_APPEND=f"-F {ssh_config}")


def ranks_of(job_id) -> dict[str, int]:
    """{rank: pid} of this job's training processes, found by the GROWLENGTH_LAUNCH_ID the batch script gives them."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        launch = env.get(b"GROWLENGTH_LAUNCH_ID", b"").decode()
        rank = env.get(b"RANK", env.get(b"SLURM_PROCID"))  # deepspeed's launch.py sets RANK; under srun, SLURM's
        if launch.startswith(f"{job_id}.") and any(a.endswith(b"launcher/pretrain.py") for a in argv) \
                and rank is not None and not any(b"deepspeed.launcher" in a for a in argv):
            found[rank.decode()] = int(proc.name)
    return found


def environ(pid) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def ancestors(pid) -> list[str]:
    """Command names from pid's parent up to PID 1."""
    names = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def preempt_and_resume(env, run_yaml, tmp_path, **export):
    """Submit a two-node job, let it pass step 2, send the batch script USR1 (what --signal=B:USR1@N delivers),
    and wait for the requeued job to finish. Returns (job id, log, {rank: environ and "_pid"} seen while it ran)."""
    run_dir = tmp_path / "run"
    job = submit_training(env, run_yaml, run_dir, tmp_path, options=TWO_NODES, **export)
    wait_for(lambda: last_step(run_dir) >= 2, "step 2")
    ranks = ranks_of(job)
    seen = {rank: dict(environ(pid), _ancestors=ancestors(pid), _pid=pid) for rank, pid in ranks.items()}
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    info = wait_job(env, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-6000:]
    assert sorted(seen) == ["0", "1"], (ranks, log[-3000:])
    assert "got SIGUSR1" in log and "preempted (SIGUSR1, launcher exit 75): requeueing job" in log, log[-6000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) at step", log)]
    assert len(resumed) == 1 and 2 < resumed[0] < 18, resumed
    assert "restart 1 " in log and "training complete" in log
    return job, log, seen


def test_two_nodes_default_srun_preempted_resumes_exactly(two_nodes, run_yaml, reference, tmp_path):
    """The default on several nodes is srun: one task per node here, each started by its node's slurmd."""
    job, log, seen = preempt_and_resume(two_nodes, run_yaml, tmp_path)
    assert "launch mode srun" in log and "srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in log
    assert "2 rank(s) = 2 node(s) x 1, master growlength-node1:" in log
    # srun takes --cpus-per-task from SRUN_CPUS_PER_TASK only (SLURM 22.05+), not from the job's SLURM_CPUS_PER_TASK
    assert "1 CPU(s) per srun task" in log and {seen[r]["SRUN_CPUS_PER_TASK"] for r in seen} == {"1"}
    assert {seen[r]["SLURMD_NODENAME"] for r in seen} == {"growlength-node1", "growlength-node2"}
    assert all("slurmstepd" in seen[r]["_ancestors"] for r in seen)
    assert re.search(r"got SIGUSR1: asking the trainer \(pids [\d ]+\)", log)  # srun, which relays it to each task
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] WARNING preempted: checkpoint at step \d+ saved; exiting with 75", log)
    assert_same_losses(tmp_path / "run", reference[0])


def test_two_nodes_deepspeed_pdsh_preempted_resumes_exactly(two_nodes, run_yaml, reference, tmp_path):
    """LAUNCH=deepspeed: the runner starts both nodes' ranks over pdsh + ssh, so they run under sshd, outside the job.
    Their environment comes from the DeepSpeed env file the script writes; the USR1 goes to this node's rank only,
    and the rank on the other node learns of it in the step's all-reduce, checkpoints and exits 75 by itself."""
    job, log, seen = preempt_and_resume(two_nodes, run_yaml, tmp_path, LAUNCH="deepspeed", MY_SITE_VAR="a b,c",
                                        DS_ENV_EXTRA="MY_SITE_.*", GROWLENGTH_NOT_SHELL_SAFE='x"$HOME"')
    run_dir = tmp_path / "run"
    assert (run_dir / "slurm" / f"hostfile.{job}").read_text() == "growlength-node1 slots=1\ngrowlength-node2 slots=1\n"
    assert "--launcher pdsh" in log and "--master_addr growlength-node1" in log
    for rank, env in seen.items():
        assert "sshd" in env["_ancestors"] and "slurmstepd" not in env["_ancestors"], (rank, env["_ancestors"])
        assert env["CROSS_RANK"] == rank  # node rank = this rank: one per node
    remote = seen["1"]
    assert remote["OMP_NUM_THREADS"] == "1" and remote["GLOO_SOCKET_IFNAME"] == "lo" and remote["MY_SITE_VAR"] == "a b,c"
    assert remote["PATH"] == os.environ["PATH"] and remote["GROWLENGTH_LAUNCH_ID"].startswith(f"{job}.0.")
    assert "GROWLENGTH_NOT_SHELL_SAFE" not in remote
    assert "WARNING: not sent to the other nodes (a quote" in log and "GROWLENGTH_NOT_SHELL_SAFE" in log
    env_file = (run_dir / "slurm" / f"deepspeed_env.{job}").read_text()
    assert "OMP_NUM_THREADS=1\n" in env_file and "GROWLENGTH_NOT_SHELL_SAFE" not in env_file
    # one process signalled, on this node; rank 1 (the other node) stopped on its own, after its checkpoint
    assert f"got SIGUSR1: asking the trainer (pids {seen['0']['_pid']} ) to checkpoint" in log, log[-4000:]
    assert re.search(r"growlength-node2: .*rank 1.*preempted: checkpoint at step \d+ saved; exiting with 75", log), \
        log[-6000:]
    assert_same_losses(run_dir, reference[0])


def test_unknown_multinode_launcher_fails_for_good(two_nodes, run_yaml, tmp_path):
    job = submit_training(two_nodes, run_yaml, tmp_path / "run", tmp_path, options=TWO_NODES, LAUNCH="deepspeed",
                          DS_MULTINODE_LAUNCHER="mpich")
    info = wait_job(two_nodes, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log
    assert "ERROR: DS_MULTINODE_LAUNCHER=mpich: use pdsh or slurm" in log
    assert job_info(two_nodes, job)["Restarts"] == "0"


def test_pdsh_mode_without_pdsh_says_what_to_do(two_nodes, run_yaml, tmp_path):
    """A PATH without pdsh (every other tool of /usr/bin linked in): one ERROR line before anything starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "pdsh":
            (bin_dir / tool.name).symlink_to(tool)
    job = submit_training(two_nodes, run_yaml, tmp_path / "run", tmp_path, options=TWO_NODES, LAUNCH="deepspeed",
                          PATH=f"{bin_dir}:/usr/sbin:/sbin")
    info = wait_job(two_nodes, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log
    assert "ERROR: DS_MULTINODE_LAUNCHER=pdsh but pdsh is not installed on" in log
    assert "install pdsh (and ssh between the nodes), or use LAUNCH=srun" in log and "launcher/pretrain.py" not in log
