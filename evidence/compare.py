"""GrowLength against fixed-length training under one budget, everything else identical (the paper's headline claim).

    python -m evidence.compare (--budget-seconds S | --budget-calibrated-seconds C | --budget-tokens N) --out DIR
        [--preset tiny] [--ranks 1] [--lengths 64,128,256] [--shares 0.5,0.3,0.2] [--tokens-per-step 2048]
        [--plans fixed-short,fixed-long,growlength] [--seeds 1,2,3] [--device auto|cpu|cuda[:N]]
        [--dtype auto|fp32|bf16]

Runs the real launcher once per plan and seed, only the stage plan differing; evaluates every checkpoint at the
longest length (on --device in --dtype: CUDA in bf16 where usable, else the CPU in fp32); charges each run its steps
at calibrated step times beside its raw wall-clock; writes DIR/report.md, summary.json and figures. Budgets and
clocks: docs/tools.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.atomic import check_dir_writable
from evidence.launch import ROOT, launch_command
from launcher import steptime
from evidence.runs import EvidenceError, add_device_arguments, compute_device, find_data_prefix, load_run, \
    parse_lengths, write_json, write_text

log = logging.getLogger("growlength")

PLANS = ("fixed-short", "fixed-long", "growlength")
OVERSIZE = 2  # wall-clock budgets: plans are sized to this many times the predicted steps


@dataclass
class Setup:
    out: Path
    budget_seconds: float | None
    budget_tokens: int | None
    lengths: list[int]
    shares: list[float]
    preset: str = "tiny"
    ranks: int = 1
    tokens_per_step: int = 2048
    seed: int = 1234
    plans: tuple = PLANS
    points: int = 6
    eval_tokens: int = 4096
    valid_fraction: float = 0.05
    data_prefix: str | None = None
    tokenizer: str | None = None
    ds_config: str = "ds_configs/zero2.json"
    extra: list = field(default_factory=list)
    calibration_rounds: int = 3
    budget_calibrated: float | None = None
    seeds: list = field(default_factory=list)  # [] = [seed]
    device: str = "auto"  # where checkpoints are evaluated (evidence.runs.compute_device)
    dtype: str = "auto"

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def run_name(self, plan: str, seed: int) -> str:
        return plan if len(self.seed_list) == 1 else f"{plan}-seed{seed}"

    @property
    def short(self) -> int:
        return self.lengths[0]

    @property
    def long(self) -> int:
        return self.lengths[-1]


def check_setup(s: Setup) -> None:
    compute_device(s.device, s.dtype)  # before any run: a device that cannot be used is refused now
    if [s.budget_seconds, s.budget_tokens, s.budget_calibrated].count(None) != 2:
        raise EvidenceError("give exactly one budget: --budget-seconds S (equal wall-clock), "
                            "--budget-calibrated-seconds C (equal calibrated time) or --budget-tokens N")
    if s.budget_seconds is not None and s.budget_seconds <= 0:
        raise EvidenceError(f"--budget-seconds {s.budget_seconds}: must be positive")
    if s.budget_calibrated is not None and s.budget_calibrated <= 0:
        raise EvidenceError(f"--budget-calibrated-seconds {s.budget_calibrated}: must be positive")
    if len(set(s.seed_list)) != len(s.seed_list):
        raise EvidenceError(f"--seeds {','.join(map(str, s.seed_list))}: each seed once")
    if s.budget_tokens is not None and s.budget_tokens < s.tokens_per_step:
        raise EvidenceError(f"--budget-tokens {s.budget_tokens}: less than one step of --tokens-per-step "
                            f"{s.tokens_per_step}")
    if len(s.lengths) < 2:
        raise EvidenceError(f"--lengths {s.lengths}: give at least a short and a long length")
    if len(s.shares) != len(s.lengths) or abs(sum(s.shares) - 1) > 1e-6 or min(s.shares) <= 0:
        raise EvidenceError(f"--shares {s.shares}: one positive share per length in --lengths {s.lengths}, "
                            f"summing to 1")
    bad = [L for L in s.lengths if s.tokens_per_step % (L * s.ranks)]
    if bad:
        raise EvidenceError(f"--tokens-per-step {s.tokens_per_step} is not a multiple of seq_len * ranks for "
                            f"lengths {bad}; use a multiple of {s.long * s.ranks}")
    if s.calibration_rounds < 1:
        raise EvidenceError(f"--calibration-rounds {s.calibration_rounds}: must be at least 1")
    unknown = set(s.plans) - set(PLANS)
    if unknown or "fixed-long" not in s.plans:
        raise EvidenceError(f"--plans {list(s.plans)}: choose from {', '.join(PLANS)}; fixed-long is the reference "
                            f"and is always needed")


# ---- plans ------------------------------------------------------------------------------------------------------
def calibration_stages(s: Setup, steps_per_round: int) -> list[dict]:
    """One calibration round: every length in turn (shortest first, as a plan must grow), each stage one warm-up
    step after its switch and then ``steps_per_round`` timed steps."""
    return [{"seq_len": L, "tokens": (1 + steps_per_round) * s.tokens_per_step} for L in s.lengths]


def calibration_times(s: Setup, rounds: list[list[dict]]) -> steptime.StepTimes:
    """launcher.steptime's summary of the calibration runs' step records (one list per run, i.e. per round); each
    stage's first step, the warm-up after its switch, is dropped."""
    timed = []
    for records in rounds:
        by_stage: dict[int, list[float]] = {}
        for r in records:
            by_stage.setdefault(r["stage"], []).append(r["tokens_per_step"] / r["tokens_per_s"])
        timed.append({L: by_stage[k][1:] for k, L in enumerate(s.lengths)})
    return steptime.summarize(timed)


def step_seconds(s: Setup, ds_config: str, steps_per_round: int = 3) -> dict[int, float]:
    """Seconds per optimizer step at each length, measured on the real launcher and engine: ``s.calibration_rounds``
    short calibration runs (OUT/runs/calibration-R), each a round over every length (:func:`calibration_stages`) in
    a fresh launcher process, so every round starts from the same process state; the median per length
    (launcher.steptime), with a warning when the machine was noisy."""
    rounds = []
    for r in range(s.calibration_rounds):
        run_dir = launch(s, f"calibration-{r}", calibration_stages(s, steps_per_round), ds_config, warmup=1,
                         extra=["checkpointing.at_stage_end=false", "checkpointing.interval_steps=0",
                                "logging.eval_lengths=[]", "growlength.max_time_s=null"])
        rounds.append(load_run(run_dir).steps)
    times = calibration_times(s, rounds)
    log.info("step times of the real engine (%d rounds of %d timed steps per length):\n%s", s.calibration_rounds,
             steps_per_round, steptime.table(times))
    warning = times.warning("the planned wall-clock shares may be off: rerun with more --calibration-rounds or on a "
                            "quiet machine")
    if warning:
        log.warning("calibration: %s", warning)
    return {L: times.median(L) for L in s.lengths}


def stage_plans(s: Setup, times: dict[int, float] | None) -> dict[str, list[dict]]:
    """``{plan name: growlength.stages}``, every stage with an absolute token budget."""
    tps = s.tokens_per_step
    if s.budget_calibrated is not None:  # each plan's steps cost C at the calibrated step times
        C = s.budget_calibrated
        grow = [max(1, round(share * C / times[L])) for share, L in zip(s.shares, s.lengths)]
        fixed = {"fixed-short": max(1, round(C / times[s.short])), "fixed-long": max(1, round(C / times[s.long]))}
    elif s.budget_tokens is not None:
        steps = s.budget_tokens // tps
        grow, given = [], 0
        for i, share in enumerate(s.shares):
            n = steps - given if i == len(s.shares) - 1 else max(1, round(share * steps))
            grow.append(n)
            given += n
        fixed = {"fixed-short": steps, "fixed-long": steps}
    else:
        # stages before the last take their share of S; the last stage and the fixed runs get OVERSIZE x their
        # predicted steps so that the clock, not the plan, ends every run (the probe is only an estimate, and with
        # a constant LR after warmup the unused part of a plan changes nothing)
        grow = [max(1, round(share * s.budget_seconds / times[L])) for share, L in zip(s.shares[:-1], s.lengths)]
        grow.append(max(1, round(OVERSIZE * s.shares[-1] * s.budget_seconds / times[s.long])))
        fixed = {"fixed-short": max(2, round(OVERSIZE * s.budget_seconds / times[s.short])),
                 "fixed-long": max(2, round(OVERSIZE * s.budget_seconds / times[s.long]))}
    if min(grow) < 1:
        raise EvidenceError(f"budget too small: GrowLength stages get {grow} steps; raise the budget")
    plans = {"fixed-short": [{"seq_len": s.short, "tokens": fixed["fixed-short"] * tps}],
             "fixed-long": [{"seq_len": s.long, "tokens": fixed["fixed-long"] * tps}],
             "growlength": [{"seq_len": L, "tokens": n * tps} for L, n in zip(s.lengths, grow)]}
    return {name: plans[name] for name in s.plans}


def ds_config_for(s: Setup) -> str:
    """The ds_config every run uses: the given one, or for a wall-clock budget the same with WarmupLR."""
    if s.budget_seconds is None:
        return s.ds_config
    from launcher.ds_config import DSConfigError, load_ds_config
    try:
        cfg = load_ds_config(str(ROOT / s.ds_config if not Path(s.ds_config).is_absolute() else s.ds_config))
    except DSConfigError as e:
        raise EvidenceError(str(e)) from None
    params = {k: v for k, v in cfg.get("scheduler", {}).get("params", {}).items()
              if k in ("warmup_min_lr", "warmup_max_lr", "warmup_type")}
    cfg["scheduler"] = {"type": "WarmupLR", "params": params}
    return str(write_json(s.out / "ds_config.json", cfg).resolve())


# ---- running ----------------------------------------------------------------------------------------------------
def launch(s: Setup, name: str, stages: list[dict], ds_config: str, warmup: int, extra: list[str] = (),
           seed: int | None = None) -> Path:
    run_dir = (s.out / "runs" / name).resolve()
    steps = sum(st["tokens"] for st in stages) // s.tokens_per_step
    if s.budget_seconds is not None:  # checkpoints spread over the predicted steps, not the oversized plan
        steps = steps // OVERSIZE
    overrides = [f"run_dir={run_dir}", f"seed={s.seed if seed is None else seed}", f"model.preset={s.preset}",
                 f"growlength.tokens_per_step={s.tokens_per_step}", "growlength.total_tokens=null",
                 f"growlength.stages={json.dumps(stages)}", f"optimisation.warmup_steps={warmup}",
                 f"data.valid_fraction={s.valid_fraction}", f"data.cache_dir={(s.out / 'index-cache').resolve()}",
                 f"checkpointing.interval_steps={max(1, steps // s.points)}", "checkpointing.keep_last=1000",
                 f"logging.eval_tokens={s.eval_tokens}", f"logging.eval_lengths=[{s.long}]",
                 "logging.eval_interval=0", f"logging.log_interval={max(1, steps // 10)}",
                 "logging.tensorboard=false", "checkpointing.resume=none"]
    if s.budget_seconds is not None:
        overrides.append(f"growlength.max_time_s={s.budget_seconds}")
    if s.data_prefix:
        overrides += [f"data.prefix={s.data_prefix}", f"data.tokenizer={s.tokenizer}"]
    cmd, env = launch_command(s.ranks)
    env.pop("GROWLENGTH_FAULT", None)
    cmd += ["--ds_config", ds_config, *overrides, *s.extra, *extra]  # later key=value wins
    log.info("%s: %s", name, " ".join(cmd))
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{name}.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}:\n{tail}")
    log.info("%s done in %.0fs (process wall-clock)", name, time.perf_counter() - t0)
    return run_dir


def calibrated_clock(records: list[dict], times: dict[int, float]) -> dict[int, float]:
    """``{step: calibrated seconds at the end of that step}``: every step charged the calibrated time of its
    length (``times``, seconds per optimizer step), whatever it took on the wall-clock."""
    clock, total = {}, 0.0
    for r in sorted(records, key=lambda r: r["step"]):
        total += times[r["seq_len"]]
        clock[r["step"]] = total
    return clock


def checkpoint_curve(run_dir: Path, s: Setup, times: dict[int, float]) -> list[dict]:
    """Validation loss at the long length for every checkpoint of a run:
    [{step, tokens_seen, elapsed_s, calibrated_s, loss}]."""
    from launcher import checkpoint as ckpt
    from evidence.evaluate import ValidationWindows, load_for_eval, perplexity

    steps = {r["step"]: r for r in load_run(run_dir).steps}
    calibrated = calibrated_clock(list(steps.values()), times)
    points, windows = [], None
    for path in ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir)):
        loaded = load_for_eval(str(path))
        if windows is None:
            data = ValidationWindows(find_data_prefix(loaded.state, loaded.source), "run", s.valid_fraction)
            windows = data.windows(s.long, max(1, s.eval_tokens // s.long))
        where, dtype = compute_device(s.device, s.dtype)
        loss, _ = perplexity(loaded.model, windows, dtype=dtype, device=where)
        st = loaded.state
        # the step record's clock: the end of that step, before the eval and save that followed it
        points.append({"step": st["step"], "tokens_seen": st["tokens_seen"],
                       "elapsed_s": steps[st["step"]]["elapsed_s"], "calibrated_s": calibrated[st["step"]],
                       "loss": loss})
    return points


def time_to_reach(points: list[dict], target: float, key: str = "elapsed_s") -> float | None:
    """First ``key`` at which the curve reaches ``target`` (linear between checkpoints; from 0 loss-free start)."""
    prev = None
    for p in points:
        if p["loss"] <= target:
            if prev is None or prev["loss"] == p["loss"]:
                return p[key]
            frac = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev[key] + frac * (p[key] - prev[key])
        prev = p
    return None


def loss_at(points: list[dict], x: float, key: str) -> float | None:
    """Validation loss at ``key`` = x (linear between checkpoints); None outside the curve."""
    prev = None
    for p in points:
        if p[key] >= x:
            if prev is None:
                return p["loss"] if p[key] == x else None
            frac = (x - prev[key]) / (p[key] - prev[key]) if p[key] > prev[key] else 1.0
            return prev["loss"] + frac * (p["loss"] - prev["loss"])
        prev = p
    return None


# ---- the report -------------------------------------------------------------------------------------------------
def summarise(s: Setup, run_dirs: dict[tuple[str, int], Path], curves: dict[tuple[str, int], list[dict]],
              times: dict[int, float]) -> dict:
    """Per run (plan, seed): its stages, clocks, losses and time to the same seed's fixed-long target; per plan the
    mean and min-max over seeds; and the conclusions that hold (or not) under both clocks and across seeds."""
    rows = {}
    for (plan, seed), run_dir in run_dirs.items():
        target = curves[("fixed-long", seed)][-1]["loss"]
        run = load_run(run_dir, s.run_name(plan, seed))
        last = run.final
        tail = [r["loss"] for r in run.steps[-5:]]
        stopped = "clock" if any("max_time_s" in line and "reached" in line
                                 for line in (run_dir / "train.log").read_text().splitlines()) else "plan end"
        curve = curves[(plan, seed)]
        rows[s.run_name(plan, seed)] = {
            "plan": plan, "seed": seed, "target_val_loss": target,
            "stages": [(st["seq_len"], st["step"], st["elapsed_s"]) for st in run.stage_starts()],
            "steps": last["step"], "tokens_seen": last["tokens_seen"], "elapsed_s": last["elapsed_s"],
            "calibrated_s": calibrated_clock(run.steps, times)[last["step"]],
            "last_step_s": last["tokens_per_step"] / last["tokens_per_s"], "stopped_by": stopped,
            "final_train_loss": last["loss"], "final_train_loss_mean5": sum(tail) / len(tail),
            "final_train_seq_len": last["seq_len"], "val_loss_long": curve[-1]["loss"],
            "time_to_target_s": time_to_reach(curve, target),
            "calibrated_to_target_s": time_to_reach(curve, target, "calibrated_s"),
            "tokens_to_target": time_to_reach(curve, target, "tokens_seen"), "curve": curve}
    by_plan = {plan: aggregate([r for r in rows.values() if r["plan"] == plan]) for plan in s.plans}
    return {"budget_seconds": s.budget_seconds, "budget_tokens": s.budget_tokens,
            "budget_calibrated_seconds": s.budget_calibrated, "preset": s.preset, "ranks": s.ranks,
            "tokens_per_step": s.tokens_per_step, "lengths": s.lengths, "shares": s.shares, "seeds": s.seed_list,
            "long": s.long, "target_val_loss": rows[s.run_name("fixed-long", s.seed_list[0])]["target_val_loss"],
            "runs": rows, "by_plan": by_plan, "conclusions": conclusions(s, rows)}


def spread(values: list) -> dict:
    """mean, min, max of the values that exist, and how many do (a run that never reached a target has None)."""
    got = [v for v in values if v is not None]
    return {"mean": sum(got) / len(got) if got else None, "min": min(got, default=None),
            "max": max(got, default=None), "n": len(got), "of": len(values)}


def aggregate(rows: list[dict]) -> dict:
    keys = ("val_loss_long", "elapsed_s", "calibrated_s", "time_to_target_s", "calibrated_to_target_s",
            "tokens_seen")
    return {k: spread([r[k] for r in rows]) for k in keys}


CLOCKS = {"wall-clock": "elapsed_s", "calibrated time": "calibrated_s"}


def conclusions(s: Setup, rows: dict) -> list[dict]:
    """For each plan against fixed-long, per clock: in how many seeds its validation loss is lower at the time the
    shorter of the two runs ended (equal time, read off both curves), and in how many it reaches fixed-long's final
    loss sooner. ``holds``: in every seed and under both clocks."""
    out = []
    for plan in [p for p in s.plans if p != "fixed-long"]:
        for claim in ("lower val loss at equal time", "reaches fixed-long's final val loss sooner"):
            per_clock = {}
            for clock, key in CLOCKS.items():
                wins = []
                for seed in s.seed_list:
                    mine, ref = rows[s.run_name(plan, seed)], rows[s.run_name("fixed-long", seed)]
                    if claim.startswith("lower"):
                        x = min(mine["curve"][-1][key], ref["curve"][-1][key])
                        a, b = loss_at(mine["curve"], x, key), loss_at(ref["curve"], x, key)
                        wins.append(a is not None and b is not None and a < b)
                    else:
                        to = "time_to_target_s" if key == "elapsed_s" else "calibrated_to_target_s"
                        wins.append(mine[to] is not None and ref[to] is not None and mine[to] < ref[to])
                per_clock[clock] = sum(wins)
            n = len(s.seed_list)
            holds = all(v == n for v in per_clock.values())
            fails = all(v == 0 for v in per_clock.values())
            out.append({"plan": plan, "claim": claim, "seeds": n, "wins": per_clock,
                        "verdict": "holds" if holds else "does not hold" if fails else "mixed"})
    return out


def fmt(x, spec=".3f", none="not reached"):
    return none if x is None else format(x, spec)


def _mean_range(x: dict, spec: str = ".4f") -> str:
    if x["mean"] is None:
        return f"not reached (0/{x['of']})"
    reached = f", {x['n']}/{x['of']} reached" if x["n"] < x["of"] else ""
    return f"{x['mean']:{spec}} ({x['min']:{spec}}-{x['max']:{spec}}{reached})"


def markdown(summary: dict, command: str, figures: list[str]) -> str:
    tps = summary["tokens_per_step"]
    b = (f"equal wall-clock: {summary['budget_seconds']:g} s of training per run" if summary["budget_seconds"]
         else f"equal calibrated time: {summary['budget_calibrated_seconds']:g} calibrated s per run"
         if summary["budget_calibrated_seconds"]
         else f"equal tokens: {summary['budget_tokens']:,} per run, in whole steps of {tps:,}: "
              f"{summary['budget_tokens'] // tps * tps:,}")
    L = summary["long"]
    seeds = summary["seeds"]
    lines = [f"# GrowLength vs fixed-length training ({b})", "", f"Command: `{command}`", "",
             f"Preset `{summary['preset']}`, {summary['ranks']} rank(s), {summary['tokens_per_step']:,} tokens per "
             f"optimizer step, seed(s) {', '.join(map(str, seeds))}; GrowLength lengths {summary['lengths']} with "
             f"shares {summary['shares']}. Validation loss is at L={L} on the same held-out windows for every run "
             f"(fp32, from each run's checkpoints). Target = the same seed's fixed-long final validation loss. "
             f"Calibrated time = each run's steps charged at the calibrated step times below (the same for every "
             f"run, whatever the machine did during it).", "",
             f"| run | stages (L from step (wall-clock)) | steps | tokens seen | wall-clock (s) | calibrated (s) | "
             f"stopped by | final train loss (mean of last 5, at L) | val loss @ L={L} | to target, wall (s) | "
             f"to target, calibrated (s) | tokens to target |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in summary["runs"].items():
        stages = " → ".join(f"{sl} from step {st} ({t:.0f} s)" for sl, st, t in r["stages"])
        lines.append(f"| {name} | {stages} | {r['steps']} | {r['tokens_seen']:,} | {r['elapsed_s']:.1f} | "
                     f"{r['calibrated_s']:.1f} | {r['stopped_by']} | {r['final_train_loss_mean5']:.4f} "
                     f"(L={r['final_train_seq_len']}) | {r['val_loss_long']:.4f} | {fmt(r['time_to_target_s'], '.1f')} "
                     f"| {fmt(r['calibrated_to_target_s'], '.1f')} | {fmt(r['tokens_to_target'], ',.0f')} |")
    lines += ["", f"Over {len(seeds)} seed(s): mean (min-max).", "",
              f"| plan | val loss @ L={L} | wall-clock (s) | calibrated (s) | to target, wall (s) | "
              f"to target, calibrated (s) |", "|---|---:|---:|---:|---:|---:|"]
    for plan, a in summary["by_plan"].items():
        lines.append(f"| {plan} | {_mean_range(a['val_loss_long'])} | {_mean_range(a['elapsed_s'], '.1f')} | "
                     f"{_mean_range(a['calibrated_s'], '.1f')} | {_mean_range(a['time_to_target_s'], '.1f')} | "
                     f"{_mean_range(a['calibrated_to_target_s'], '.1f')} |")
    lines += ["", "Conclusions against fixed-long (seeds where it holds, per clock; a conclusion holds only if it "
              "does in every seed under both clocks):", ""]
    for c in summary["conclusions"]:
        wins = ", ".join(f"{clock} {k}/{c['seeds']}" for clock, k in c["wins"].items())
        lines.append(f"- {c['plan']} {c['claim']}: **{c['verdict']}** ({wins})")
    if summary.get("step_seconds"):
        lines += ["", "Calibrated seconds per optimizer step (real engine, interleaved calibration runs before the "
                  "runs, medians): " + ", ".join(f"L={k}: {v:.3f}" for k, v in summary["step_seconds"].items()) + "."]
    lines += ["", "Training losses at different lengths are not comparable (a short window gives each token less "
              "context); the validation column is.", ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"


def compare(s: Setup, command: str = "") -> dict:
    check_setup(s)
    check_dir_writable(s.out, "--out", error=EvidenceError)  # before the runs: a report that cannot be saved is refused, not lost
    s.out.mkdir(parents=True, exist_ok=True)
    ds_config = ds_config_for(s)
    times = step_seconds(s, ds_config)  # every budget: the calibrated clock is charged to every run
    plans = stage_plans(s, times)
    if s.budget_tokens is not None:
        warmup = max(1, round(0.05 * s.budget_tokens // s.tokens_per_step))
    else:
        budget = s.budget_seconds if s.budget_seconds is not None else s.budget_calibrated
        warmup = max(1, round(0.05 * budget / max(times.values())))
    order = ["fixed-long"] + [p for p in s.plans if p != "fixed-long"]
    run_dirs = {(name, seed): launch(s, s.run_name(name, seed), plans[name], ds_config, warmup, seed=seed)
                for seed in s.seed_list for name in order}
    curves = {key: checkpoint_curve(d, s, times) for key, d in run_dirs.items()}
    first = s.seed_list[0]  # the extrapolation curves and the figures: the first seed's runs
    ordered = [n for n in PLANS if n in s.plans]
    reports = []
    from evidence.evaluate import evaluate
    eval_lengths = sorted(set(s.lengths) | {2 * s.long, 4 * s.long})
    for name in ordered:  # each final model's extrapolation curve (Figure 4)
        rep = evaluate(str(run_dirs[(name, first)]), lengths=eval_lengths, tokens=s.eval_tokens, split="run",
                       dtype=s.dtype, device=s.device)
        reports.append(str(write_json(s.out / f"eval_{name}.json", rep)))
    summary = summarise(s, run_dirs, curves, times)
    summary["step_seconds"] = times
    summary["plans"] = plans

    from evidence.plot import plot_runs
    extra = {n: [(p["tokens_seen"], p["elapsed_s"], p["loss"]) for p in curves[(n, first)]] for n in ordered}
    figures = plot_runs([str(run_dirs[(n, first)]) for n in ordered], str(s.out), ordered, s.long,
                        eval_reports=reports, extra_val=extra, run_ppl=False)
    write_json(s.out / "summary.json", summary)
    write_text(s.out / "report.md", markdown(summary, command, [str(f) for f in figures]))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-seconds", type=float, help="equal training wall-clock per run")
    budget.add_argument("--budget-tokens", type=int, help="equal tokens per run")
    budget.add_argument("--budget-calibrated-seconds", type=float,
                        help="equal calibrated time per run (steps charged at the calibration's step times)")
    p.add_argument("--out", required=True, help="report directory (runs under OUT/runs)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--lengths", default="64,128,256", help="GrowLength stages; first = fixed-short, last = fixed-long")
    p.add_argument("--shares", default="0.5,0.3,0.2", help="GrowLength share of the budget per length")
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", help="comma-separated seeds: every plan once per seed (default: --seed alone)")
    p.add_argument("--plans", default=",".join(PLANS), help="subset of the plans to run (fixed-long required)")
    p.add_argument("--points", type=int, default=6, help="checkpoints per run for the validation curve")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--data-prefix", help="training corpus PREFIX (default: the built-in corpus)")
    p.add_argument("--tokenizer", help="sentencepiece model of --data-prefix")
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("--calibration-rounds", type=int, default=3,
                   help="calibration runs before the runs, each timing every length once in turn")
    add_device_arguments(p, "evaluation")
    p.add_argument("overrides", nargs="*", help="extra key=value passed to every run (e.g. model.num_layers=4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        shares = [float(x) for x in args.shares.split(",")]
    except ValueError:
        log.error("--shares %r: comma-separated numbers, e.g. 0.5,0.3,0.2", args.shares)
        return 2
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else []
    except ValueError:
        log.error("--seeds %r: comma-separated integers, e.g. 1,2,3", args.seeds)
        return 2
    s = Setup(out=Path(args.out), budget_seconds=args.budget_seconds, budget_tokens=args.budget_tokens,
              lengths=None, shares=shares, preset=args.preset, ranks=args.ranks,
              tokens_per_step=args.tokens_per_step, seed=args.seed, plans=tuple(args.plans.split(",")),
              points=args.points, eval_tokens=args.eval_tokens, valid_fraction=args.valid_fraction,
              data_prefix=args.data_prefix, tokenizer=args.tokenizer, ds_config=args.ds_config,
              extra=args.overrides, calibration_rounds=args.calibration_rounds,
              budget_calibrated=args.budget_calibrated_seconds, seeds=seeds, device=args.device, dtype=args.dtype)
    try:
        s.lengths = parse_lengths(args.lengths)
        if (s.data_prefix is None) != (s.tokenizer is None):
            raise EvidenceError("--data-prefix and --tokenizer go together")
        summary = compare(s, "python -m evidence.compare " + " ".join(argv if argv is not None else sys.argv[1:]))
    except EvidenceError as e:
        log.error("%s", e)
        return 2
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    print((s.out / "report.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
