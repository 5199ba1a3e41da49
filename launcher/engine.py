"""Everything that touches DeepSpeed: starting its process group, the ZeRO engine, the stage's batch sizes,
the accumulation boundary, checkpoint I/O.

This is the only module that imports deepspeed (DESIGN.md decision 4, STYLE.md). The environment it starts from
(launcher discovery, device binding, timeouts) and the collectives are in ``launcher.distributed``.
"""
from __future__ import annotations

import logging

from launcher import versions

versions.require()  # one line and exit 2 for a torch or DeepSpeed too old, before importing either

import deepspeed  # noqa: E402
import torch  # noqa: E402

from launcher import distributed  # noqa: E402
from launcher.checkpoint import CheckpointError  # noqa: E402
from launcher.distributed import DIST_TIMEOUT, RANK0_TIMEOUT  # noqa: E402
from launcher.schedule import LRSchedule, ScheduledLR  # noqa: E402

log = logging.getLogger(__name__)

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (60-90 s on first use) that only its
# inference path calls; ZeRO training never does, so skip the build.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (NCCL on CUDA, gloo on CPU); returns ``(rank, world_size, local_rank)``, the local
    rank as the launcher gave it (launcher.distributed.prepare maps the environment first).

    Collectives time out after GROWLENGTH_DIST_TIMEOUT_MIN minutes (default 30); a second, gloo group with
    GROWLENGTH_RANK0_TIMEOUT_MIN (default 360) carries the waits for rank 0's start-up work (wait_for_rank0)."""
    timeout, rank0_timeout = distributed.timeout_setting(DIST_TIMEOUT), distributed.timeout_setting(RANK0_TIMEOUT)
    local_rank = distributed.prepare()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    distributed.create_rank0_group(rank0_timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def create_engine(model: torch.nn.Module, ds_config: dict, param_groups: list[dict] | None = None,
                  lr_schedule: LRSchedule | None = None):
    """One ZeRO engine for the whole run; stages change its batch sizes, never the engine.

    ``param_groups`` (torch optimizer groups) go to the optimizer DeepSpeed builds from the JSON; a group without
    its own ``weight_decay`` takes the JSON's value. ``lr_schedule`` (ours) becomes the engine's scheduler, which it
    steps after each update and checkpoints; None leaves the JSON's scheduler section (if any) in charge."""
    params = param_groups if param_groups is not None else model.parameters()
    # a factory, not an object: DeepSpeed hands it the optimizer it built from the JSON
    scheduler = (lambda optimizer: ScheduledLR(optimizer, lr_schedule)) if lr_schedule is not None else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cpu_adam_or_fallback(ds_config),
                                           lr_scheduler=scheduler)
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


def step_applied(engine) -> bool:
    """Whether the last ``engine.step()`` updated the weights (False when fp16 loss scaling skipped an overflow)."""
    return engine.was_step_applied()


def save_checkpoint(engine, save_dir: str, tag: str) -> None:
    """DeepSpeed's part of a save (model, optimizer, scheduler); the launcher's state is launcher.checkpoint's."""
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)


def load_checkpoint(engine, load_dir: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"{load_dir}/{tag}: DeepSpeed found no checkpoint there; resume from another one")
    if isinstance(engine.lr_scheduler, ScheduledLR):  # ours decides the rate, not the optimizer's restored groups
        engine.lr_scheduler.apply()


def close() -> None:
    distributed.close()
    # DeepSpeed caches a clone of the world group; a later run in this process (a notebook, the in-process
    # tests) must not broadcast over the destroyed one
    from deepspeed.utils import groups
    groups._WORLD_GROUP = None


def consolidated_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """The full fp32 model state dict from a ZeRO checkpoint (DeepSpeed's own zero_to_fp32 utilities)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
