"""How much sooner a plan trains than the fixed-length plan: predicted from step times before training, realized from
a run's metrics records after it. Pure functions over plain numbers and records (no torch, no files), so that each
is checked against hand-made tables and hand-made metrics.

  prediction    tokens per step are constant, so a plan's time for its tokens is each stage's steps at the step time
                of its length; against a fixed plan at length R for the same tokens that is
                ``sum_k share_k * t(L_k) / t(R)`` with ``share_k`` the stage's share of the plan's tokens
  clocks        a run's training clock (its step times plus its stage switches: start-up, evaluations and
                checkpoints are not training and are left out) and its calibrated clock (every step charged the
                calibrated step time of its length, whatever the machine did meanwhile)
  time to loss  the first time, under a clock, at which a run's validation loss at one length reaches a target,
                linear between evaluations; None when it never does
"""
from __future__ import annotations

from evidence.runs import Run


def token_shares(stages: list[dict]) -> dict[int, float]:
    """``{seq_len: share of the plan's tokens}`` of ``[{"seq_len": L, "tokens": N}, ...]``."""
    total = sum(st["tokens"] for st in stages)
    shares: dict[int, float] = {}
    for st in stages:
        shares[st["seq_len"]] = shares.get(st["seq_len"], 0.0) + st["tokens"] / total
    return shares


def predicted_ratio(stages: list[dict], step_seconds: dict[int, float], reference_seq_len: int) -> float:
    """Predicted time of the plan ``stages`` over the time of a fixed plan at ``reference_seq_len`` for the same
    tokens, from seconds per optimizer step at each length (``step_seconds``, the same tokens per step)."""
    per_step = sum(share * step_seconds[L] for L, share in token_shares(stages).items())
    return per_step / step_seconds[reference_seq_len]


def training_clock(run: Run) -> dict[int, float]:
    """``{step: training seconds at the end of that step}``: the launcher's own time of each step
    (``tokens_per_step / tokens_per_s``, measured around the step) plus each stage switch (``switch_s`` of the stage
    record, charged to the stage's first step)."""
    switches: dict[int, float] = {}
    for st in run.stage_starts():
        switches[st["step"] + 1] = st.get("switch_s", 0.0)
    clock, total = {}, 0.0
    for r in run.steps:
        total += switches.get(r["step"], 0.0) + r["tokens_per_step"] / r["tokens_per_s"]
        clock[r["step"]] = total
    return clock


def calibrated_clock(records: list[dict], step_seconds: dict[int, float]) -> dict[int, float]:
    """``{step: calibrated seconds at the end of that step}``: every step record charged ``step_seconds`` of its
    length, whatever it took on the wall-clock."""
    clock, total = {}, 0.0
    for r in sorted(records, key=lambda r: r["step"]):
        total += step_seconds[r["seq_len"]]
        clock[r["step"]] = total
    return clock


def validation_curve(run: Run, seq_len: int, step_seconds: dict[int, float]) -> list[dict]:
    """``[{step, tokens_seen, train_s, calibrated_s, elapsed_s, loss}]``: every eval record of the run with a
    validation loss at ``seq_len``, its clocks read at the end of the step it followed."""
    train, calibrated = training_clock(run), calibrated_clock(run.steps, step_seconds)
    steps = {r["step"]: r for r in run.steps}
    key = f"val_loss_{seq_len}"
    return [{"step": e["step"], "tokens_seen": steps[e["step"]]["tokens_seen"], "train_s": train[e["step"]],
             "calibrated_s": calibrated[e["step"]], "elapsed_s": steps[e["step"]]["elapsed_s"], "loss": e[key]}
            for e in run.evals if key in e and e["step"] in steps]


def time_to_loss(curve: list[dict], target: float, key: str = "train_s") -> float | None:
    """First ``key`` at which the curve's loss is at or below ``target``: linear between the evaluation before and
    the first one at or below it (the first evaluation's own time when it already is); None if it never is."""
    prev = None
    for p in curve:
        if p["loss"] <= target:
            if prev is None:
                return p[key]
            frac = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev[key] + frac * (p[key] - prev[key])
        prev = p
    return None


def loss_at(curve: list[dict], x: float, key: str) -> float | None:
    """Validation loss at ``key`` = x (linear between evaluations); None outside the curve."""
    prev = None
    for p in curve:
        if p[key] >= x:
            if prev is None:
                return p["loss"] if p[key] == x else None
            frac = (x - prev[key]) / (p[key] - prev[key]) if p[key] > prev[key] else 1.0
            return prev["loss"] + frac * (p["loss"] - prev["loss"])
        prev = p
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (a target never reached)."""
    return None if a is None or b is None or b == 0 else a / b
