"""Everything that touches DeepSpeed: process-group start-up, the ZeRO engine, collectives, checkpoint I/O.

This is the only module that imports deepspeed (DESIGN.md decision 4, STYLE.md).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import deepspeed
import deepspeed.comm as dist
import torch

log = logging.getLogger(__name__)

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (60-90 s on first use) that only its
# inference path calls; ZeRO training never does, so skip the build.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _map_launcher_env() -> None:
    """Fill torch.distributed's env:// variables from Open MPI or SLURM when a launcher other than
    ``deepspeed`` started us (DeepSpeed itself never reads SLURM_*, and its MPI discovery picks a fixed port
    and a non-loopback address)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    env = os.environ
    if "OMPI_COMM_WORLD_RANK" in env:  # checked first: under mpirun inside sbatch every rank has SLURM_PROCID=0
        rank, world, local = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"], env.get(
            "OMPI_COMM_WORLD_LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # an srun task (the batch step has no STEP_ID)
        rank, world, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", "0")
    else:
        rank, world, local = "0", "1", "0"
    env.setdefault("RANK", rank)
    env.setdefault("WORLD_SIZE", world)
    env.setdefault("LOCAL_RANK", local)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (NCCL on CUDA, gloo on CPU); returns ``(rank, world_size, local_rank)``."""
    _map_launcher_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    timeout = timedelta(minutes=int(os.environ.get("GROWLENGTH_DIST_TIMEOUT_MIN", "30")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def create_engine(model: torch.nn.Module, ds_config: dict):
    """One ZeRO engine for the whole run; stages change its batch sizes, never the engine."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def set_stage_batch(engine, micro_batch_size: int, grad_accum: int, world_size: int) -> None:
    """Tell the engine the stage's micro-batch and accumulation (it keeps reporting the old ones otherwise,
    and scales the loss by the accumulation it believes in)."""
    engine.set_train_micro_batch_size(micro_batch_size)
    engine.set_train_batch_size(micro_batch_size * grad_accum * world_size)


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


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
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def consolidated_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """The full fp32 model state dict from a ZeRO checkpoint (DeepSpeed's own zero_to_fp32 utilities)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
