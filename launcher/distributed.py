"""The distributed environment without DeepSpeed: which launcher started us (deepspeed, torchrun, srun, mpirun) and
the env:// variables it implies, the GPU a rank binds, the socket interface across nodes, timeouts, and the small
collectives the launcher uses (sums, maxima, broadcasts, barriers, waiting for rank 0's start-up work).

``launcher.engine.init_distributed`` calls :func:`prepare` before DeepSpeed starts the process group and
:func:`create_rank0_group` after it; everything else here works on any initialised torch.distributed group.
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, MutableMapping

import torch
import torch.distributed as dist

from launcher.net import free_port, socket_ifnames

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
EXPANDABLE_SEGMENTS = "expandable_segments:True"

# (variable, default minutes): how long a collective may wait (NCCL's watchdog, gloo's timeout), and how long the
# other ranks wait for rank 0's one-off start-up work (the built-in corpus, the sample index of a large corpus)
DIST_TIMEOUT = ("GROWLENGTH_DIST_TIMEOUT_MIN", 30.0)
RANK0_TIMEOUT = ("GROWLENGTH_RANK0_TIMEOUT_MIN", 360.0)
# connecting the rank-0 group's gloo mesh: every rank is already up (the main group exists), so this takes seconds
# unless gloo chose an address the other nodes cannot reach, which must fail fast instead of after RANK0_TIMEOUT
RANK0_GROUP_CONNECT = timedelta(minutes=2)

_rank0_group = None  # a gloo group with RANK0_TIMEOUT, for wait_for_rank0


@dataclass(frozen=True)
class LaunchEnv:
    """What :func:`map_launcher_env` found: the launcher's name and whether every rank runs on this node."""

    kind: str
    one_node: bool


def job_master_port(job_id: str | int) -> int:
    """The rendezvous port for one job (SLURM job id, or Open MPI's job id), so that two jobs sharing a node do
    not collide: 10000-29999, below the kernel's ephemeral range. slurm/pretrain.sbatch uses the same formula."""
    return 10000 + int(job_id) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist, where task 0 runs: ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    head = re.match(r"[^,\[]*(\[[^\]]*\])?", nodelist).group(0)
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + re.split(r"[-,\]]", ranges)[0]


def _free_port() -> int:
    return free_port("")  # any interface: rank 0's store listens where the others can reach it


def _mpi_rendezvous(one_node: bool) -> tuple[str, str] | None:
    """Rank 0's address and a free port on it, broadcast over MPI; None without mpi4py."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):  # not installed, or no MPI library
        return None
    comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:
        mine = ("127.0.0.1" if one_node else socket.gethostbyname(socket.getfqdn()), str(_free_port()))
    return comm.bcast(mine, root=0)


def _launcher_one_node(env) -> bool:
    """Whether a deepspeed / torchrun launch is on one node: the deepspeed runner exports CROSS_SIZE (nodes), torchrun
    LOCAL_WORLD_SIZE; otherwise a loopback MASTER_ADDR says so."""
    if "CROSS_SIZE" in env:
        return env["CROSS_SIZE"] == "1"
    if "LOCAL_WORLD_SIZE" in env:
        return env["LOCAL_WORLD_SIZE"] == env["WORLD_SIZE"]
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    return addr == "localhost" or addr.startswith("127.") or addr == "::1"


def map_launcher_env() -> LaunchEnv:
    """Fill torch.distributed's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    whichever launcher started us. Values already in the environment always win.

    DeepSpeed never reads SLURM_*, and its MPI discovery takes MASTER_ADDR from ``hostname -I`` and a fixed port
    29500, so we fill all five ourselves and start DeepSpeed with ``auto_mpi_discovery=False``. Checked in order:
      * deepspeed / torchrun: RANK and WORLD_SIZE set (only missing ones are filled);
      * Open MPI: mpirun, also inside sbatch, where every rank inherits the batch step's SLURM_PROCID=0;
      * an srun task (the batch step itself has SLURM_PROCID=0 but no SLURM_STEP_ID);
      * otherwise a single process.
    Master: 127.0.0.1 when every rank is on this node, else the allocation's first host (SLURM), else rank 0's
    address over mpi4py (mpirun without SLURM). Port: from the SLURM job id (or Open MPI's job id, or a free port
    broadcast over mpi4py) so that concurrent jobs on one node do not collide.
    """
    env = os.environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID", "")
    port = job_master_port(job_id) if job_id.isdigit() else None
    if "RANK" in env and "WORLD_SIZE" in env:
        kind, rank, world, local = "launcher", env["RANK"], env["WORLD_SIZE"], env.get("LOCAL_RANK", "0")
        one_node = _launcher_one_node(env)
        nodelist = None  # the deepspeed launcher and torchrun export MASTER_ADDR themselves
    elif "OMPI_COMM_WORLD_RANK" in env:
        kind, rank, world = "openmpi", env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        one_node = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world) == world
        ompi_job = env.get("OMPI_MCA_ess_base_jobid", "")
        if port is None and ompi_job.isdigit():
            port = job_master_port(ompi_job)
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            found = _mpi_rendezvous(one_node)
            if found:
                env.setdefault("MASTER_ADDR", found[0])
                env.setdefault("MASTER_PORT", found[1])
            elif not one_node and not nodelist and "MASTER_ADDR" not in env:
                raise RuntimeError(f"mpirun across several nodes ({world} ranks, "
                                   f"{env.get('OMPI_COMM_WORLD_LOCAL_SIZE')} on this node): pass rank 0's host, "
                                   f"e.g. mpirun -x MASTER_ADDR=<first host> ..., or pip install mpi4py "
                                   f"(the 'mpi' extra) so rank 0 broadcasts it")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        kind, rank, world = "slurm", env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
        local = env.get("SLURM_LOCALID", "0")
        one_node = env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "1")) == "1"
    else:
        kind, rank, world, local, one_node = "single", "0", "1", "0", True
    env.setdefault("RANK", rank)
    env.setdefault("WORLD_SIZE", world)
    env.setdefault("LOCAL_RANK", local)
    env.setdefault("MASTER_ADDR", "127.0.0.1" if one_node or not nodelist else first_host(nodelist))
    if "MASTER_PORT" not in env:  # a lone process can take any free port
        env["MASTER_PORT"] = str(_free_port() if world == "1" else port or 29500)
    return LaunchEnv(kind, one_node)


def bind_device_ordinal(env: MutableMapping[str, str], device_count: int) -> int:
    """Make LOCAL_RANK the CUDA ordinal this rank uses, and return the launcher's own local rank (for logs).

    DeepSpeed binds ``cuda:LOCAL_RANK`` itself (init_distributed's ``device_id``, the engine's ``set_device``).
    Under ``srun --gpus-per-task=1`` or ``--gpu-bind`` each task sees one GPU, so local rank 3 must use device 0:
    the ordinal is ``local_rank % device_count``. Open MPI's local rank is aligned too, because DeepSpeed's engine
    asserts that the two agree. Without visible devices nothing changes."""
    local_rank = int(env["LOCAL_RANK"])
    if device_count > 0 and local_rank >= device_count:
        ordinal = str(local_rank % device_count)
        env["LOCAL_RANK"] = ordinal
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = ordinal
    return local_rank


def set_socket_ifnames(env: MutableMapping[str, str], launch: LaunchEnv, choose: Callable = socket_ifnames) -> None:
    """Across nodes, point gloo and NCCL at the interface that reaches MASTER_ADDR unless the user set one."""
    if launch.one_node:
        return
    chosen = choose(env, env["MASTER_ADDR"])
    env.update(chosen)
    if chosen:
        log.info("socket interface %s (the route to MASTER_ADDR %s) for %s", next(iter(chosen.values())),
                 env["MASTER_ADDR"], ", ".join(chosen))
    elif not all(env.get(v) for v in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")):
        log.warning("no network interface found that reaches MASTER_ADDR %s: gloo and NCCL choose their own; set "
                    "GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME if ranks on other nodes cannot connect",
                    env["MASTER_ADDR"])


def set_allocator_defaults() -> None:
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user configured the allocator: every stage
    has new shapes, and fixed-size segments left by the last stage's activations fragment the cache. Set in the
    environment before CUDA initialises (the allocator reads it then; ranks and probes started from here inherit
    it), and applied at once if CUDA already has."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(EXPANDABLE_SEGMENTS)


def timeout_setting(setting: tuple[str, float]) -> timedelta:
    """A timeout from its environment variable, in minutes (fractions allowed). A bad value exits with status 2
    and one line (this runs before the launcher's own error handling: there is no process group yet)."""
    name, default = setting
    raw = os.environ.get(name, str(default))
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < math.inf:
        print(f"error: {name}={raw!r}: must be a positive number of minutes (default {default:g}); unset it or "
              f"e.g. export {name}={default:g}", file=sys.stderr)
        raise SystemExit(2)
    return timedelta(minutes=minutes)


def prepare() -> int:
    """Everything the process group needs from the environment, before it starts: the allocator setting (first:
    before anything can initialise CUDA), the env:// variables, the device ordinal and the socket interface.
    Returns the launcher's local rank."""
    set_allocator_defaults()
    launch = map_launcher_env()
    local_rank = bind_device_ordinal(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    set_socket_ifnames(os.environ, launch)
    log.debug("process group from %s (local rank %d): %s", launch.kind, local_rank,
              {k: os.environ[k] for k in ENV_KEYS})
    return local_rank


def create_rank0_group(timeout: timedelta) -> None:
    """The gloo group that wait_for_rank0 uses, with ``timeout`` for its operations. Its mesh is connected under
    RANK0_GROUP_CONNECT, so an unreachable address fails in minutes, naming the fix."""
    global _rank0_group
    try:
        group = dist.new_group(backend="gloo", timeout=min(RANK0_GROUP_CONNECT, timeout))
    except RuntimeError as e:
        raise RuntimeError(f"the ranks could not connect a gloo group ({e}); set GLOO_SOCKET_IFNAME to the network "
                           f"interface that reaches MASTER_ADDR={os.environ.get('MASTER_ADDR')}") from e
    dist.distributed_c10d._set_pg_timeout(timeout, group)
    _rank0_group = group


def wait_for_rank0(work, rank: int, world: int) -> None:
    """Run ``work()`` on rank 0 while the other ranks wait for it; then every rank goes on, or raises what it raised.

    Work that outlasts the collective timeout (the sample index of a large corpus) must not leave the others in a
    barrier of the main group, where NCCL's watchdog (or gloo) would abort them after GROWLENGTH_DIST_TIMEOUT_MIN:
    they wait in a broadcast on the gloo group made by create_rank0_group, whose timeout is
    GROWLENGTH_RANK0_TIMEOUT_MIN, and no operation is pending on the main group meanwhile. An exception on rank 0
    is raised on every rank (same type and message), instead of leaving them waiting until that timeout."""
    failure = None
    if rank == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised here
            failure = e
    if world > 1:
        group = _rank0_group or dist.group.WORLD
        box = [None if failure is None else (type(failure), str(failure))]
        dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
        if rank != 0 and box[0] is not None:
            kind, message = box[0]
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - a type that needs other arguments
                error = RuntimeError(f"rank 0 failed: {kind.__name__}: {message}")
            raise error
    if failure is not None:
        raise failure


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum_tensor(t: torch.Tensor) -> list[float]:
    """Sum a small 1-D tensor over ranks in place and bring it to the host: one collective, one copy."""
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a pickled object over the process group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier() -> None:
    dist.barrier()


def close() -> None:
    """Destroy the process group (and the rank-0 group with it)."""
    global _rank0_group
    _rank0_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
