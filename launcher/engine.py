"""Everything that touches DeepSpeed: process-group start-up, the ZeRO engine, collectives, checkpoint I/O.

This is the only module that imports deepspeed (DESIGN.md decision 4, STYLE.md).
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
from datetime import timedelta

from launcher import versions

versions.require()  # one line and exit 2 for a torch or DeepSpeed too old, before importing either

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402

from launcher.net import free_port  # noqa: E402

log = logging.getLogger(__name__)

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (60-90 s on first use) that only its
# inference path calls; ZeRO training never does, so skip the build.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def job_master_port(job_id: str | int) -> int:
    """The rendezvous port for one job (SLURM job id, or Open MPI's job id), so that two jobs sharing a node do
    not collide: 10000-29999, below the kernel's ephemeral range. slurm/pretrain.sbatch uses the same formula."""
    return 10000 + int(job_id) % 20000


def _first_host(nodelist: str) -> str:
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


def _map_launcher_env() -> str:
    """Fill torch.distributed's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    whichever launcher started us, and return its name. Values already in the environment always win.

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
        one_node = True  # the deepspeed launcher always exports MASTER_ADDR; torchrun too
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
    env.setdefault("MASTER_ADDR", "127.0.0.1" if one_node or not nodelist else _first_host(nodelist))
    if "MASTER_PORT" not in env:  # a lone process can take any free port
        env["MASTER_PORT"] = str(_free_port() if world == "1" else port or 29500)
    return kind


EXPANDABLE_SEGMENTS = "expandable_segments:True"

# (variable, default minutes): how long a collective may wait (NCCL's watchdog, gloo's timeout), and how long the
# other ranks wait for rank 0's one-off start-up work (the built-in corpus, the sample index of a large corpus)
DIST_TIMEOUT = ("GROWLENGTH_DIST_TIMEOUT_MIN", 30.0)
RANK0_TIMEOUT = ("GROWLENGTH_RANK0_TIMEOUT_MIN", 360.0)

_rank0_group = None  # a gloo group with RANK0_TIMEOUT, for wait_for_rank0


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


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (NCCL on CUDA, gloo on CPU); returns ``(rank, world_size, local_rank)``.

    Collectives time out after GROWLENGTH_DIST_TIMEOUT_MIN minutes (default 30); a second, gloo group with
    GROWLENGTH_RANK0_TIMEOUT_MIN (default 360) carries the waits for rank 0's start-up work (wait_for_rank0)."""
    set_allocator_defaults()  # first: before anything below can initialise CUDA
    timeout, rank0_timeout = timeout_setting(DIST_TIMEOUT), timeout_setting(RANK0_TIMEOUT)
    kind = _map_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # srun --gpus-per-task / --gpu-bind leave each task one visible GPU: LOCAL_RANK 3 is then device 0
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    log.debug("process group from %s: %s", kind, {k: os.environ[k] for k in _ENV_KEYS})
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    global _rank0_group
    _rank0_group = torch.distributed.new_group(backend="gloo", timeout=rank0_timeout)
    return dist.get_rank(), dist.get_world_size(), local_rank


def wait_for_rank0(work, rank: int, world: int) -> None:
    """Run ``work()`` on rank 0 while the other ranks wait for it; then every rank goes on, or raises what it raised.

    Work that outlasts the collective timeout (the sample index of a large corpus) must not leave the others in a
    barrier of the main group, where NCCL's watchdog (or gloo) would abort them after GROWLENGTH_DIST_TIMEOUT_MIN:
    they wait in a broadcast on the gloo group made by init_distributed, whose timeout is
    GROWLENGTH_RANK0_TIMEOUT_MIN, and no operation is pending on the main group meanwhile. An exception on rank 0
    is raised on every rank (same type and message), instead of leaving them waiting until that timeout."""
    failure = None
    if rank == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised here
            failure = e
    if world > 1:
        group = _rank0_group or torch.distributed.group.WORLD
        box = [None if failure is None else (type(failure), str(failure))]
        torch.distributed.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
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


def create_engine(model: torch.nn.Module, ds_config: dict, param_groups: list[dict] | None = None):
    """One ZeRO engine for the whole run; stages change its batch sizes, never the engine.

    ``param_groups`` (torch optimizer groups) go to the optimizer DeepSpeed builds from the JSON; a group without
    its own ``weight_decay`` takes the JSON's value."""
    params = param_groups if param_groups is not None else model.parameters()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cpu_adam_or_fallback(ds_config))
    log.info("optimizer %s%s", type(engine.basic_optimizer).__name__,
             " (ZeRO-Offload: the update runs on the CPU)" if engine.zero_cpu_offload() else "")
    return engine


def uses_cpu_adam(ds_config: dict) -> bool:
    """Whether DeepSpeed will build its CPU Adam for this config: Adam/AdamW with the optimizer offloaded to the
    CPU and no ``torch_adam``."""
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    opt = ds_config.get("optimizer") or {}
    return (offload.get("device") == "cpu" and str(opt.get("type", "")).lower() in ("adam", "adamw")
            and not (opt.get("params") or {}).get("torch_adam"))


def cpu_adam_or_fallback(ds_config: dict, builder=None) -> dict:
    """``ds_config``, or where DeepSpeed's CPU Adam op (a C++ extension it JIT-compiles on first use, cached under
    TORCH_EXTENSIONS_DIR) cannot be built here, a copy with ``optimizer.params.torch_adam`` set: torch's AdamW on
    the CPU, slower, with a warning that says why. ``builder`` is for tests (default: DeepSpeed's CPUAdamBuilder)."""
    if not uses_cpu_adam(ds_config):
        return ds_config
    if builder is None:
        from deepspeed.ops.op_builder import CPUAdamBuilder
        builder = CPUAdamBuilder()
    try:
        builder.load(verbose=False)
        return ds_config
    except Exception as e:  # noqa: BLE001 - any build failure: no compiler, no ninja, a missing header
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    log.warning("DeepSpeed's CPU Adam could not be built here (%s): the offloaded optimizer runs torch's AdamW on "
                "the CPU instead, several times slower; install g++ and ninja (pip install ninja) for CPU Adam, or set "
                "optimizer.params.torch_adam: true in the ds_config to silence this", reason[:300])
    out = {**ds_config, "optimizer": {**ds_config["optimizer"],
                                      "params": {**ds_config["optimizer"].get("params", {}), "torch_adam": True}}}
    return out


def set_stage_batch(engine, micro_batch_size: int, grad_accum: int, world_size: int) -> None:
    """Tell the engine the stage's micro-batch and accumulation (it keeps reporting the old ones otherwise,
    and scales the loss by the accumulation it believes in)."""
    engine.set_train_micro_batch_size(micro_batch_size)
    engine.set_train_batch_size(micro_batch_size * grad_accum * world_size)


def begin_schedule(engine) -> None:
    """Start a fresh run's LR schedule at iteration 0.

    DeepSpeed's schedulers are built at iteration -1 (the minimum rate) and advance after each optimizer step, so
    step k would run at iteration k - 2 and the first two steps both at warmup_min_lr. One advance before the first
    step makes step k run at iteration k - 1: the schedule as written (warmup over warmup_num_steps steps, zero at
    total_num_steps). A resumed run loads the scheduler's position instead."""
    sched = engine.lr_scheduler
    if sched is not None and getattr(sched, "last_batch_iteration", None) == -1:
        sched.step()


def set_accumulation_boundary(engine, is_boundary: bool) -> None:
    """Tell the engine, before a micro-batch's forward/backward, whether it is the last of its optimizer step.

    DeepSpeed's own rule, ``(micro_steps + 1) % gradient_accumulation_steps == 0``, counts micro-batches over the
    whole run: after a stage of 3 steps at accumulation 1, a stage at accumulation 4 would put its boundaries at the
    first micro-batch of each step. The launcher owns the boundary instead (DESIGN.md decision 3)."""
    engine.set_gradient_accumulation_boundary(is_boundary)


def all_reduce_sum_tensor(t: torch.Tensor) -> list[float]:
    """Sum a small 1-D tensor over ranks in place and bring it to the host: one collective, one copy."""
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a pickled object over the process group)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
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


def save_checkpoint(engine, save_dir: str, tag: str, client_state: dict) -> None:
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine, load_dir: str, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {load_dir}/{tag}")
    return client_state


def close() -> None:
    global _rank0_group
    _rank0_group = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # DeepSpeed caches a clone of the world group; a later run in this process (a notebook, the in-process
    # tests) must not broadcast over the destroyed one
    from deepspeed.utils import groups
    groups._WORLD_GROUP = None


def consolidated_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """The full fp32 model state dict from a ZeRO checkpoint (DeepSpeed's own zero_to_fp32 utilities)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
