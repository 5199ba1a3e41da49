"""A real SLURM cluster for the cluster tests (two nodes on loopback addresses, slurm/setup_local_cluster.sh): used when
up, started (as root) when not, else skipped; the shared tiny run config and the uninterrupted reference run."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_jobs import RUN_YAML, log_of, submit_training, wait_job

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "slurm" / "setup_local_cluster.sh"
DEFAULT_CONF = "/tmp/growlength-slurm/slurm.conf"


def _node_state(env) -> str:
    """The state all nodes share ("idle"), or "" when they differ or SLURM does not answer."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    states = set(out.stdout.split()) if out.returncode == 0 else set()
    return states.pop() if len(states) == 1 else ""


@pytest.fixture(scope="session")
def slurm_env(spawns):
    """The environment for sbatch/squeue/scontrol calls (SLURM_CONF set), with the node up."""
    env = dict(os.environ, SLURM_CONF=os.environ.get("SLURM_CONF", DEFAULT_CONF))
    if _node_state(env) in ("idle", "mixed", "allocated"):
        return env
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no SLURM cluster is up and this is not root on Debian: start one with "
                    "`sudo bash slurm/setup_local_cluster.sh` (make test does it when run as root)")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"slurm/setup_local_cluster.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    env["SLURM_CONF"] = DEFAULT_CONF
    assert _node_state(env) == "idle", "setup_local_cluster.sh returned but the node is not idle"
    return env


@pytest.fixture(scope="session")
def mpirun(slurm_env):
    """Path of Open MPI's mpirun (setup_local_cluster.sh installs it)."""
    path = shutil.which("mpirun")
    if not path:
        pytest.skip("mpirun not found: apt-get install openmpi-bin (slurm/setup_local_cluster.sh does)")
    return path


@pytest.fixture(scope="session")
def run_yaml(tmp_path_factory, tokenized, sp_model):
    d = tmp_path_factory.mktemp("cluster")
    path = d / "tiny.yaml"
    path.write_text(RUN_YAML.format(prefix=tokenized, tokenizer=sp_model, cache=d / "index-cache"))
    return path


@pytest.fixture(scope="session")
def reference(slurm_env, run_yaml, tmp_path_factory):
    """`sbatch slurm/pretrain.sbatch` with 2 tasks, deepspeed mode, run to the end: (run_dir, log, job id)."""
    d = tmp_path_factory.mktemp("reference")
    job = submit_training(slurm_env, run_yaml, d / "run", d)
    info = wait_job(slurm_env, job)
    log = log_of(d, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    return d / "run", log, job
