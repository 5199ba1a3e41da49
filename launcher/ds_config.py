"""The DeepSpeed config: read the user's JSON, fill what follows from the stage plan, refuse contradictions.

DeepSpeed owns ZeRO, precision, optimizer and scheduler; the launcher owns the batch keys and the scheduler's step
counts, and refuses a JSON that sets one of them to another value, naming the key. Pure dict code: DeepSpeed itself
is imported in one launcher module only.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from data_pipeline.errors import UserError
from launcher.plan import StagePlan


class DSConfigError(UserError):
    """A ds_config that cannot be used with this run; the message names the file, the key and the fix."""


# scheduler type -> the params keys whose step counts the launcher fills
_SCHEDULER_STEP_KEYS = {
    "WarmupLR": ("warmup_num_steps",),
    "WarmupDecayLR": ("warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps"),
}


# what this DeepSpeed accepts (deepspeed/runtime/config.py DEEPSPEED_OPTIMIZERS, matched lower-cased, and
# lr_schedules.VALID_LR_SCHEDULES); other names are looked up in torch.optim / torch.optim.lr_scheduler, as
# DeepSpeed does
DEEPSPEED_OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")
DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
ZERO_STAGES = (0, 1, 2, 3)     # DeepSpeed's
TESTED_ZERO_STAGES = (1, 2)    # what this launcher ships (ds_configs/) and tests
_SECTIONS = ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16")


# keys whose values DeepSpeed uses as numbers or booleans (a string there ends in a traceback deep inside it)
_NUMBERS = {None: ("gradient_clipping", "steps_per_print"),
            "optimizer.params": ("lr", "weight_decay", "eps", "momentum"),
            "scheduler.params": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps",
                                 "cos_min_ratio", "warmup_min_ratio"),
            "fp16": ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"),
            "zero_optimization": ("reduce_bucket_size", "allgather_bucket_size")}
_BOOLS = {None: ("prescale_gradients", "wall_clock_breakdown"), "fp16": ("enabled",), "bf16": ("enabled",),
          "zero_optimization": ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions")}


def _type_errors(cfg: dict) -> list[str]:
    """``KEY is "abc": DeepSpeed needs a number here`` for every typed key of the wrong JSON type."""
    def section(where):
        node = cfg
        for key in (where or "").split(".") if where else ():
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}
    errors = []
    for table, kind, ok in ((_NUMBERS, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
                            (_BOOLS, "true or false", lambda v: isinstance(v, bool))):
        for where, keys in table.items():
            node = section(where)
            for key in keys:
                if key in node and node[key] is not None and not ok(node[key]):
                    name = f"{where}.{key}" if where else key
                    errors.append(f"{name} is {json.dumps(node[key])}: DeepSpeed needs {kind} here")
    return errors


def load_ds_config(path: str) -> dict:
    """The user's DeepSpeed JSON, checked by :func:`check_ds_config`; raises :class:`DSConfigError`."""
    p = Path(path)
    shipped = "the shipped ones are in ds_configs/ (zero2.json, zero1.json, zero2_offload.json)"
    if p.is_dir():
        raise DSConfigError(f"--ds_config {path} is a directory; give a JSON file ({shipped})")
    if not p.is_file():
        raise DSConfigError(f"--ds_config {path}: no such file; {shipped}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DSConfigError(f"--ds_config {path} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DSConfigError(f"--ds_config {path}: cannot read it ({e}); {shipped}") from None
    if not isinstance(cfg, dict):
        raise DSConfigError(f"--ds_config {path} must hold a JSON object, got {type(cfg).__name__}")
    check_ds_config(cfg, path)
    return cfg


def _known_torch(module: str, name: str) -> bool:
    import importlib
    return isinstance(getattr(importlib.import_module(module), name, None), type)


def check_ds_config(cfg: dict, source: str = "ds_config") -> None:
    """Refuse what DeepSpeed would reject late (or with a traceback) and what this launcher cannot train with:
    non-object sections, a ZeRO stage outside 0-3, a missing or unknown optimizer, an unknown scheduler, fp16 and
    bf16 together. Every problem is collected, then raised once, each naming the key and the fix."""
    errors = [f"{key} must be a JSON object, got {json.dumps(cfg[key])}" for key in _SECTIONS
              if key in cfg and not isinstance(cfg[key], dict)]
    errors += [f"{key}.params must be a JSON object, got {json.dumps(cfg[key]['params'])}"
               for key in ("optimizer", "scheduler")
               if isinstance(cfg.get(key), dict) and not isinstance(cfg[key].get("params", {}), dict)]
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        stage = zero["stage"]
        if isinstance(stage, bool) or stage not in ZERO_STAGES:
            errors.append(f"zero_optimization.stage is {json.dumps(stage)}: DeepSpeed's ZeRO stages are 0, 1, 2 and 3; "
                          f"this launcher ships and tests stages {' and '.join(map(str, TESTED_ZERO_STAGES))} "
                          f"(ds_configs/zero1.json, ds_configs/zero2.json)")
    opt = cfg.get("optimizer")
    if opt is None:
        errors.append('no "optimizer" section: the launcher trains with the optimizer DeepSpeed builds from it; add '
                      'e.g. "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}} '
                      '(see ds_configs/zero2.json)')
    elif isinstance(opt, dict):
        name = opt.get("type")
        if not isinstance(name, str) or not (name.lower() in DEEPSPEED_OPTIMIZERS or _known_torch("torch.optim", name)):
            errors.append(f"optimizer.type is {json.dumps(name)}: not an optimizer DeepSpeed knows; use one of "
                          f"{', '.join(DEEPSPEED_OPTIMIZERS)} (any case) or a torch.optim class name such as SGD")
    sched = cfg.get("scheduler")
    if isinstance(sched, dict):
        name = sched.get("type")
        if not isinstance(name, str) or not (name in DEEPSPEED_SCHEDULERS
                                             or _known_torch("torch.optim.lr_scheduler", name)):
            errors.append(f"scheduler.type is {json.dumps(name)}: not a scheduler DeepSpeed knows; use one of "
                          f"{', '.join(DEEPSPEED_SCHEDULERS)} (the launcher fills the step counts of "
                          f"{', '.join(_SCHEDULER_STEP_KEYS)}), a torch.optim.lr_scheduler class name, or remove "
                          f"the section for a constant learning rate")
    errors += _type_errors(cfg)
    if all(isinstance(cfg.get(k), dict) and cfg[k].get("enabled") for k in ("fp16", "bf16")):
        errors.append("fp16.enabled and bf16.enabled are both true; enable one")
    if errors:
        raise DSConfigError(f"--ds_config {source}: " + errors[0] if len(errors) == 1 else
                            f"--ds_config {source} has {len(errors)} problems:\n  " + "\n  ".join(errors))


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """LR warmup in steps; at least 1, since DeepSpeed's warmup schedulers divide by it."""
    n = warmup_steps if warmup_steps is not None else int(round(warmup_fraction * total_steps))
    return max(1, n)


def fill_ds_config(cfg: dict, plan: StagePlan, warmup: int, source: str = "ds_config",
                   schedule_type: str = "ds_config") -> dict:
    """A copy of ``cfg`` with the batch keys (for the first stage) and scheduler step counts filled in.

    Keys the user already set must equal the launcher's values; ``"auto"`` means "fill it". With one of our
    schedules (``schedule_type`` other than ``ds_config``) the JSON must not have its own scheduler: two schedulers
    would both set the rate.
    """
    if schedule_type != "ds_config" and "scheduler" in cfg:
        raise DSConfigError(f"{source} has a \"scheduler\" section ({(cfg['scheduler'] or {}).get('type')}) and the "
                            f"run config sets schedule.type: {schedule_type}; both would set the learning rate: "
                            f"remove the scheduler section from the JSON, or set schedule.type: ds_config")
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
    if all(isinstance(out.get(k), dict) and out[k].get("enabled") for k in ("fp16", "bf16")):
        errors.append(f"{source}: fp16.enabled and bf16.enabled are both true; enable one")
    if errors:
        raise DSConfigError("the DeepSpeed config contradicts the run config:\n  " + "\n  ".join(errors))
    return out
