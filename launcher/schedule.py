"""The learning-rate schedule: a pure function of the optimizer step, counted in tokens, and the small scheduler object
DeepSpeed holds, steps after each update and checkpoints with the rest.

``schedule.type`` (run config): ``ds_config`` (default: the ds_config's own scheduler section, as before), or one of
ours, resolved against the stage plan into token counts (:func:`resolve`):

- ``constant``: linear warmup, then the peak rate;
- ``cosine``: linear warmup, then a cosine from the peak to ``min_lr_ratio * peak`` at the end of the run;
- ``wsd`` (warmup-stable-decay): warmup, the peak until the decay starts (the last ``decay`` share of the tokens, or
  the first token of stage ``decay_from_stage``), then ``decay_shape`` (linear, cosine or 1-sqrt) down to
  ``min_lr_ratio * peak`` at the end of the run.

Step ``k`` (0-based) has seen ``t = k * tokens_per_step`` tokens before it; its factor of the peak rate is
``min(warmup(t), decay(t))`` with ``warmup(t) = min(1, (t + tokens_per_step) / warmup_tokens)`` (the first step
already trains; the last warmup step is at the peak) and, from ``t >= decay_start``,
``decay(t) = m + (1 - m) * shape((t - decay_start) / (total_tokens - decay_start))``. No torch here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from data_pipeline.errors import UserError

TYPES = ("ds_config", "constant", "cosine", "wsd")
SHAPES = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "1-sqrt": lambda q: 1.0 - math.sqrt(q),
}


class ScheduleError(UserError):
    """A schedule that does not fit the plan; the message names the field and the fix."""


@dataclass(frozen=True)
class LRSchedule:
    """One of our schedules, resolved into tokens of this plan."""

    type: str
    tokens_per_step: int
    total_tokens: int
    warmup_tokens: int
    decay_start: int  # tokens seen when the decay starts; total_tokens = no decay
    decay_shape: str
    min_lr_ratio: float

    def factor(self, step: int) -> float:
        """The multiple of the peak learning rate that optimizer step ``step`` (0-based) trains at."""
        seen = step * self.tokens_per_step
        warm = min(1.0, (seen + self.tokens_per_step) / self.warmup_tokens) if self.warmup_tokens else 1.0
        if seen < self.decay_start or self.decay_start >= self.total_tokens:  # (the latter: no decay)
            return warm
        q = min(1.0, (seen - self.decay_start) / (self.total_tokens - self.decay_start))
        return min(warm, self.min_lr_ratio + (1.0 - self.min_lr_ratio) * SHAPES[self.decay_shape](q))

    def describe(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the start-up log, in steps and tokens."""
        tps = self.tokens_per_step
        text = f"LR schedule {self.type}: warmup {self.warmup_tokens:,} tokens ({-(-self.warmup_tokens // tps)} steps)"
        if self.decay_start < self.total_tokens:
            text += (f", {self.decay_shape} decay from {self.decay_start:,} tokens (after step "
                     f"{-(-self.decay_start // tps)}) to {self.min_lr_ratio:g} x peak at {self.total_tokens:,}")
        return text


def resolve(cfg, plan) -> LRSchedule | None:
    """``cfg`` (the run config's ``schedule`` section) against ``plan`` (a StagePlan); None for ``ds_config``."""
    if cfg.type == "ds_config":
        return None
    total, tps = plan.total_tokens, plan.tokens_per_step
    warmup = int(round(cfg.warmup * total))
    if cfg.type == "constant":
        start = total
    elif cfg.type == "cosine":
        start = warmup
    elif cfg.decay_from_stage is not None:
        if cfg.decay_from_stage >= len(plan.stages):
            raise ScheduleError(f"schedule.decay_from_stage is {cfg.decay_from_stage} but the plan has "
                                f"{len(plan.stages)} stages (0-based); use 0..{len(plan.stages) - 1} or null")
        start = plan.stages[cfg.decay_from_stage].first_step * tps
    else:
        start = total - int(round(cfg.decay * total))
    if start < warmup:
        raise ScheduleError(f"schedule: the decay would start at token {start:,}, inside the warmup of {warmup:,} "
                            f"tokens; lower schedule.warmup or schedule.decay (or pick a later decay_from_stage)")
    return LRSchedule(cfg.type, tps, total, warmup, start, cfg.decay_shape, cfg.min_lr_ratio)


class ScheduledLR:
    """The scheduler object the engine holds: sets every optimizer group's rate to its peak (the rate the group was
    built with, from the ds_config's optimizer.params.lr) times ``schedule.factor(step)``. DeepSpeed calls
    :meth:`step` after each applied update and saves/loads :meth:`state_dict` with its checkpoint."""

    def __init__(self, optimizer, schedule: LRSchedule):
        self.optimizer, self.schedule = optimizer, schedule
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0  # updates applied: the 0-based index of the next step
        self.apply()

    def apply(self) -> None:
        """Set the groups' rates for the next step (also after a checkpoint load restored the optimizer's groups)."""
        factor = self.schedule.factor(self.step_count)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "schedule": self.schedule.describe()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self.apply()
