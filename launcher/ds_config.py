"""The DeepSpeed config: read the user's JSON, fill what follows from the stage plan, refuse contradictions.

DeepSpeed owns ZeRO, precision, optimizer and scheduler (DESIGN.md decision 4). The launcher owns the batch
keys and the scheduler's step counts, because they follow from the GrowLength plan: a JSON that sets one of them
to a different value is refused, naming the key. Pure dict code: DeepSpeed itself is imported in engine.py only.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from launcher.plan import StagePlan


class DSConfigError(ValueError):
    """A ds_config that cannot be used with this run; the message names the file, the key and the fix."""


# scheduler type -> the params keys whose step counts the launcher fills
_SCHEDULER_STEP_KEYS = {
    "WarmupLR": ("warmup_num_steps",),
    "WarmupDecayLR": ("warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps"),
}


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DSConfigError(f"--ds_config {path}: no such file; the shipped ones are in ds_configs/ "
                            f"(zero2.json, zero1.json, zero2_offload.json)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"--ds_config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise DSConfigError(f"--ds_config {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """LR warmup in steps; at least 1, since DeepSpeed's warmup schedulers divide by it."""
    n = warmup_steps if warmup_steps is not None else int(round(warmup_fraction * total_steps))
    return max(1, n)


def fill_ds_config(cfg: dict, plan: StagePlan, warmup: int, source: str = "ds_config") -> dict:
    """A copy of ``cfg`` with the batch keys (for the first stage) and scheduler step counts filled in.

    Keys the user already set must equal the launcher's values; ``"auto"`` means "fill it".
    """
    first = plan.stages[0]
    want = {
        "train_micro_batch_size_per_gpu": first.micro_batch_size,
        "gradient_accumulation_steps": first.grad_accum,
        "train_batch_size": first.micro_batch_size * first.grad_accum * plan.world_size,
    }
    out = copy.deepcopy(cfg)
    errors = []

    def put(where: dict, key: str, value, name: str):
        have = where.get(key, "auto")
        if have not in ("auto", value):
            errors.append(f"{source}: {name} is {have!r} but the GrowLength plan needs {value!r} "
                          f"(it changes per stage and follows from growlength.tokens_per_step); "
                          f"remove the key or set it to \"auto\"")
        where[key] = value

    for key, value in want.items():
        put(out, key, value, key)
    sched = out.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        keys = _SCHEDULER_STEP_KEYS.get(sched.get("type"), ())
        counts = {"warmup_num_steps": warmup, "total_num_steps": plan.total_steps}
        for key in keys:
            put(params, key, counts[key], f"scheduler.params.{key}")
    if "fp16" in out and out["fp16"].get("enabled") and out.get("bf16", {}).get("enabled"):
        errors.append(f"{source}: fp16.enabled and bf16.enabled are both true; enable one")
    if errors:
        raise DSConfigError("the DeepSpeed config contradicts the run config:\n  " + "\n  ".join(errors))
    return out
