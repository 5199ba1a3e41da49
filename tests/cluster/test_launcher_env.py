"""launcher.distributed.map_launcher_env: the five env:// variables from deepspeed, Open MPI or srun (no cluster needed)."""
import os

import pytest

from launcher.distributed import first_host, job_master_port, map_launcher_env

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMIX_")):
            monkeypatch.delenv(k)
    for k in KEYS:  # map_launcher_env writes these: register them so monkeypatch restores them afterwards
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    def set_env(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, v)
        kind = map_launcher_env().kind
        return kind, tuple(os.environ[k] for k in KEYS)
    return set_env


def test_srun_task_single_node(env):
    kind, got = env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_NTASKS="2",
                    SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="1", SLURM_JOB_NODELIST="n1")
    assert kind == "slurm" and got == ("1", "2", "1", "127.0.0.1", str(job_master_port(4242)))


def test_srun_task_multi_node_uses_first_host(env):
    kind, got = env(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8",
                    SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[03-04]")
    assert got == ("5", "8", "1", "gpu03", "10007")


def test_batch_step_is_one_process(env):
    """The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=2 but is not a rank of a 2-rank job."""
    kind, got = env(SLURM_JOB_ID="9", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
    assert kind == "single" and got[:4] == ("0", "1", "0", "127.0.0.1")


def test_mpirun_inside_sbatch_reads_ompi_first(env, monkeypatch):
    """Every rank of mpirun-in-sbatch inherits SLURM_PROCID=0; without mpi4py the port follows the SLURM job."""
    monkeypatch.setattr("launcher.distributed._mpi_rendezvous", lambda one_node: None)  # as if mpi4py were missing
    kind, got = env(SLURM_JOB_ID="9", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1",
                    OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
                    OMPI_COMM_WORLD_LOCAL_SIZE="2", OMPI_MCA_ess_base_jobid="123")
    assert kind == "openmpi" and got == ("1", "2", "1", "127.0.0.1", "10009")


def test_mpirun_across_nodes_without_slurm_or_mpi4py_says_what_to_set(env, monkeypatch):
    monkeypatch.setattr("launcher.distributed._mpi_rendezvous", lambda one_node: None)
    with pytest.raises(RuntimeError, match="mpirun across several nodes.*-x MASTER_ADDR"):
        env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="2")


def test_launcher_values_win(env):
    kind, got = env(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="29501",
                    SLURM_JOB_ID="9", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1")
    assert kind == "launcher" and got == ("3", "4", "1", "h0", "29501")


def test_first_host_of_hostlists():
    assert [first_host(n) for n in ("localhost", "gpu[03-05,07],cpu1", "a1,b[2-3]", "node[7]", "x-y[010-012]")] \
        == ["localhost", "gpu03", "a1", "node7", "x-y010"]
